//! The whole report: the machine, the date, the commit, the cases' sections, and what was not
//! measured.

use crate::host::{Accel, Machine};
use crate::markdown::{Align, Table};

/// Everything about the run that is not a measurement.
#[derive(Debug, Clone)]
pub struct Meta {
    /// `YYYY-MM-DD HH:MM UTC`.
    pub date: String,
    /// `git rev-parse --short HEAD`.
    pub commit: String,
    /// Whether tracked files had uncommitted changes.
    pub dirty: bool,
    /// The host.
    pub machine: Machine,
    /// `qemu-system-x86_64 --version` (first line) and which binary.
    pub qemu: String,
    /// The backend the instance reported.
    pub backend: Option<String>,
    /// The arguments the tool was run with.
    pub command: String,
    /// Cases not run (`--only`).
    pub skipped: Vec<String>,
    /// Of those, the ones whose sections are kept from the earlier report.
    pub kept: Vec<String>,
}

/// The UTC date and time of a Unix time, `YYYY-MM-DD HH:MM UTC`.
pub fn utc_date(unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64;
    let rem = unix_secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

/// The machine table; the backend row only when `with_backend` (it is known once an instance
/// ran).
pub fn machine_table(meta: &Meta, with_backend: bool) -> Table {
    let m = &meta.machine;
    let mut t = Table::new(&[("host", Align::Left), ("", Align::Left)]);
    t.row(&["CPU", &m.cpu]);
    t.row(&["cores", &m.cores.to_string()]);
    let ram = m
        .ram_kib
        .map(|k| format!("{:.1} GiB", k as f64 / (1024.0 * 1024.0)))
        .unwrap_or_else(|| "unknown".into());
    t.row(&["RAM", &ram]);
    t.row(&["kernel", &m.kernel]);
    let accel = match m.accel.accel {
        Accel::Kvm => format!("KVM ({})", m.accel.why),
        Accel::Tcg => format!("TCG ({})", m.accel.why),
    };
    t.row(&["acceleration", &accel]);
    t.row(&["QEMU", &meta.qemu]);
    if with_backend {
        t.row(&[
            "gatevm backend",
            meta.backend
                .as_deref()
                .unwrap_or("unknown (no instance started)"),
        ]);
    }
    t
}

/// The report in Markdown: `sections` are the cases' sections in order, each already rendered
/// (this run's, or one kept from the earlier report); `not_measured` lists what the cases could
/// not measure and why.
pub fn render(meta: &Meta, sections: &[String], not_measured: &[String]) -> String {
    let mut s = String::from("# gatevm benchmarks\n\n");
    s.push_str(&format!(
        "Measured on {} at gatevm commit `{}`{} by `scripts/bench.sh` (the `gatevm-bench` tool in `bench/`), run as `{}`. \
         Every row stands beside a baseline measured in the same run on the same machine.{}\n\n",
        meta.date,
        meta.commit,
        if meta.dirty { " (plus uncommitted changes)" } else { "" },
        meta.command,
        if meta.kept.is_empty() {
            String::new()
        } else {
            format!(
                " The cases {} were not run this time: their sections are kept from the earlier report, each marked with the date and commit it was measured at.",
                meta.kept.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")
            )
        }
    ));
    s.push_str("## Machine\n\n");
    s.push_str(&machine_table(meta, true).render());
    s.push('\n');
    for sec in sections {
        s.push_str(sec);
    }
    s.push_str("## Not measured\n\n");
    if not_measured.is_empty() && meta.skipped.is_empty() {
        s.push_str("Nothing: every case ran and measured every row.\n");
    }
    for n in not_measured {
        s.push_str(&format!("- {n}\n"));
    }
    for c in &meta.skipped {
        if meta.kept.contains(c) {
            s.push_str(&format!(
                "- {c}: not run this time (`--only`); its section above is kept from the earlier report.\n"
            ));
        } else {
            s.push_str(&format!("- {c}: not run this time (`--only`).\n"));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::{choose_accel, Machine};
    use crate::markdown::Section;

    #[test]
    fn dates() {
        assert_eq!(utc_date(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc_date(951_782_400), "2000-02-29 00:00 UTC");
        assert_eq!(utc_date(1_700_000_000), "2023-11-14 22:13 UTC");
        assert_eq!(utc_date(4_107_542_399), "2100-02-28 23:59 UTC");
    }

    #[test]
    fn report_layout() {
        let meta = Meta {
            date: "2026-05-07 12:00 UTC".into(),
            commit: "b51f269".into(),
            dirty: true,
            machine: Machine {
                cpu: "Some CPU".into(),
                cores: 2,
                ram_kib: Some(8 * 1024 * 1024),
                kernel: "6.8.0".into(),
                accel: choose_accel(true, true, true),
            },
            qemu: "QEMU emulator version 9.2.0".into(),
            backend: Some("qemu/tcg".into()),
            command: "gatevm-bench --runs 5".into(),
            skipped: vec!["import".into(), "net".into()],
            kept: vec!["net".into()],
        };
        let sec = Section {
            title: "Boot".into(),
            ..Default::default()
        };
        let md = render(
            &meta,
            &[sec.render(), "## Network\n\n_Kept._\n\n".into()],
            &["Network through passt: this gatevm has no --net passt.".into()],
        );
        assert!(md.starts_with("# gatevm benchmarks\n\nMeasured on 2026-05-07 12:00 UTC at gatevm commit `b51f269` (plus uncommitted changes) by"));
        assert!(md.contains("| RAM            | 8.0 GiB"));
        assert!(md.contains("| acceleration   | TCG (software emulation: kvm_pvm is loaded"));
        assert!(md.contains("| gatevm backend | qemu/tcg"));
        assert!(!machine_table(&meta, false).render().contains("backend"));
        let boot = md.find("## Boot").unwrap();
        let later = md
            .find("## Not measured\n\n- Network through passt: this gatevm has no --net passt.\n")
            .unwrap();
        assert!(boot < later);
        assert!(md.ends_with("- import: not run this time (`--only`).\n- net: not run this time (`--only`); its section above is kept from the earlier report.\n"));
        assert!(md.contains("on the same machine. The cases `net` were not run this time: their sections are kept from the earlier report, each marked with the date and commit it was measured at.\n\n## Machine"));
        assert!(md.find("## Network").unwrap() > boot);
        let all = Meta {
            skipped: vec![],
            kept: vec![],
            ..meta
        };
        assert!(render(&all, &[], &[])
            .ends_with("## Not measured\n\nNothing: every case ran and measured every row.\n"));
    }
}
