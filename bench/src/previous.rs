//! The report a run replaces (docs/benchmarks.md as it was): its sections, kept for the cases
//! not run this time (`--only`), and earlier numbers that a new section compares with.

/// The words that mark a section kept from an earlier report.
pub const KEPT_MARK: &str = "Kept from an earlier report";

/// The date and the commit of a report's first paragraph (`Measured on DATE at gatevm commit
/// `C``).
pub fn measured(md: &str) -> Option<(String, String)> {
    let rest = md.split("Measured on ").nth(1)?;
    let (date, rest) = rest.split_once(" at gatevm commit `")?;
    let (commit, _) = rest.split_once('`')?;
    if date.contains('\n') || commit.is_empty() || commit.contains(char::is_whitespace) {
        return None;
    }
    Some((date.to_string(), commit.to_string()))
}

/// The `## ` sections, each as its title and its whole text (heading included, up to the next
/// `## ` heading).
pub fn sections(md: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in md.split_inclusive('\n') {
        if let Some(title) = line.strip_prefix("## ") {
            out.push((title.trim().to_string(), String::new()));
        }
        if let Some((_, text)) = out.last_mut() {
            text.push_str(line);
        }
    }
    out
}

/// The section titled `title`.
pub fn section<'m>(all: &'m [(String, String)], title: &str) -> Option<&'m str> {
    all.iter()
        .find(|(t, _)| t == title)
        .map(|(_, s)| s.as_str())
}

/// The cells of a section's table lines (header rows included, separator rows left out), in
/// the order they appear, each trimmed; an escaped `\|` stays inside its cell.
pub fn table_rows(section: &str) -> Vec<Vec<String>> {
    section
        .lines()
        .filter(|l| l.starts_with('|') && l.trim_end().len() >= 2 && l.trim_end().ends_with('|'))
        .map(|l| {
            let inner = &l.trim_end()[1..l.trim_end().len() - 1];
            let mut cells = Vec::new();
            let mut cur = String::new();
            let mut chars = inner.chars().peekable();
            while let Some(c) = chars.next() {
                match c {
                    '\\' if chars.peek() == Some(&'|') => {
                        chars.next();
                        cur.push('|');
                    }
                    '|' => cells.push(std::mem::take(&mut cur)),
                    c => cur.push(c),
                }
            }
            cells.push(cur);
            cells.into_iter().map(|c| c.trim().to_string()).collect()
        })
        .filter(|cells: &Vec<String>| {
            !cells
                .iter()
                .all(|c| !c.is_empty() && c.chars().all(|ch| ch == '-' || ch == ':'))
        })
        .collect()
}

/// A section of an earlier report as it is kept: marked as kept, with where it comes from
/// (once: a section kept before keeps its first mark).
pub fn kept_section(text: &str, date: &str, commit: &str) -> String {
    let mut out = text.trim_end().to_string();
    out.push_str("\n\n");
    if text.contains(KEPT_MARK) {
        return out;
    }
    let (heading, body) = out.split_once('\n').unwrap_or((out.as_str(), ""));
    format!(
        "{heading}\n\n_{KEPT_MARK} (measured on {date} at gatevm commit `{commit}`): this case was not run this time._\n{body}"
    )
}

/// The note on virtiofsd's memory before the root became disks, from the report this run
/// replaces: its virtiofsd and all-helpers rows where it has them, else the same note it
/// carried over itself.
pub fn virtiofsd_before(md: &str) -> Option<String> {
    let all = sections(md);
    let mem = section(&all, "Host memory")?;
    let rows = table_rows(mem);
    let header = rows.first()?;
    let describe = |r: &Vec<String>| {
        header
            .iter()
            .zip(r)
            .skip(1)
            .map(|(h, v)| format!("{h} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let vfs = rows.iter().find(|r| r[0].starts_with("virtiofsd"));
    let Some(vfs) = vfs else {
        return mem
            .lines()
            .find_map(|l| l.strip_prefix("- Before (commit "))
            .map(|l| format!("Before (commit {l}"));
    };
    let (date, commit) = measured(md)?;
    let mut s = format!(
        "Before (commit {commit}), an earlier measurement ({date}, when virtiofsd served the instance's root as a shared directory), in MiB: `{}`: {}",
        vfs[0],
        describe(vfs)
    );
    if let Some(h) = rows.iter().find(|r| r[0].starts_with("all helpers")) {
        s.push_str(&format!("; `{}`: {}", h[0], describe(h)));
    }
    s.push('.');
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = "# gatevm benchmarks\n\n\
        Measured on 2026-12-05 14:05 UTC at gatevm commit `f85c1e6` by `scripts/bench.sh`.\n\n\
        ## Machine\n\n| host | |\n| --- | --- |\n| CPU | x |\n\n\
        ## Host memory\n\nRuns: 5.\n\n\
        | process | processes | idle VmRSS | idle own (anon+file) |\n\
        | ------- | --------: | ---------: | -------------------: |\n\
        | supervisor | 1 | 9.73 | 9.73 |\n\
        | virtiofsd | 2 | 48.4 | 7.46 |\n\
        | all helpers (supervisor + network helper + virtiofsd, not the VM) | 4 | 77.8 | 36.9 |\n\n\
        - A note.\n\n\
        ## Image import throughput\n\nRuns: 5.\n\n| a\\|b | c |\n| --- | --: |\n| x | 1 |\n\n\
        ## Not measured\n\nNothing.\n";

    #[test]
    fn date_and_commit() {
        assert_eq!(
            measured(OLD),
            Some(("2026-12-05 14:05 UTC".into(), "f85c1e6".into()))
        );
        assert_eq!(measured("# gatevm benchmarks\n\nNothing yet.\n"), None);
        assert_eq!(measured("Measured on x at gatevm commit `` by"), None);
    }

    #[test]
    fn sections_split_at_headings() {
        let s = sections(OLD);
        let titles: Vec<&str> = s.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(
            titles,
            [
                "Machine",
                "Host memory",
                "Image import throughput",
                "Not measured"
            ]
        );
        let import = section(&s, "Image import throughput").unwrap();
        assert!(import.starts_with("## Image import throughput\n\nRuns: 5.\n"));
        assert!(import.ends_with("| x | 1 |\n\n"));
        assert_eq!(section(&s, "Boot"), None);
        // Together the sections are the report after its first paragraph.
        let joined: String = s.iter().map(|(_, t)| t.as_str()).collect();
        assert!(OLD.ends_with(&joined));
    }

    #[test]
    fn table_cells() {
        let s = sections(OLD);
        let rows = table_rows(section(&s, "Image import throughput").unwrap());
        assert_eq!(rows, vec![vec!["a|b", "c"], vec!["x", "1"]]);
        let mem = table_rows(section(&s, "Host memory").unwrap());
        assert_eq!(mem.len(), 4);
        assert_eq!(mem[2], vec!["virtiofsd", "2", "48.4", "7.46"]);
    }

    #[test]
    fn every_case_is_found_by_its_title() {
        // A run with --only keeps the other cases' sections by their titles.
        let md: String = crate::Case::ALL
            .iter()
            .map(|c| format!("## {}\n\n{} numbers.\n\n", c.title(), c.name()))
            .collect();
        let all = sections(&md);
        for c in crate::Case::ALL {
            let text = section(&all, c.title()).unwrap_or_else(|| panic!("{}", c.name()));
            assert!(text.contains(&format!("{} numbers.", c.name())), "{text}");
        }
        let vol = section(&all, crate::Case::Volume.title()).unwrap();
        assert!(vol.starts_with("## Shared directory throughput\n"));
    }

    #[test]
    fn a_kept_section_is_marked_once() {
        let s = sections(OLD);
        let import = section(&s, "Image import throughput").unwrap();
        let kept = kept_section(import, "2026-12-05 14:05 UTC", "f85c1e6");
        assert!(kept.starts_with(
            "## Image import throughput\n\n_Kept from an earlier report (measured on 2026-12-05 14:05 UTC at gatevm commit `f85c1e6`): this case was not run this time._\n\nRuns: 5.\n"
        ));
        assert!(kept.ends_with("| x | 1 |\n\n"));
        // Kept again by a later partial run: the first mark (the date it was measured) stays.
        assert_eq!(kept_section(&kept, "2026-12-07 10:00 UTC", "abcdef0"), kept);
    }

    #[test]
    fn virtiofsd_numbers_are_carried_over() {
        let note = virtiofsd_before(OLD).unwrap();
        assert_eq!(
            note,
            "Before (commit f85c1e6), an earlier measurement (2026-12-05 14:05 UTC, when virtiofsd served the instance's root as a shared directory), in MiB: `virtiofsd`: processes 2, idle VmRSS 48.4, idle own (anon+file) 7.46; `all helpers (supervisor + network helper + virtiofsd, not the VM)`: processes 4, idle VmRSS 77.8, idle own (anon+file) 36.9."
        );
        // A later report without the row carries the note on as it was.
        let later = format!(
            "Measured on 2026-12-07 10:30 UTC at gatevm commit `1234567` by x.\n\n## Host memory\n\n| process | n |\n| --- | --: |\n| supervisor | 1 |\n\n- No virtiofsd runs.\n- {note}\n\n## Not measured\n"
        );
        assert_eq!(virtiofsd_before(&later).as_deref(), Some(note.as_str()));
        assert_eq!(
            virtiofsd_before("## Host memory\n\n| process |\n| --- |\n| passt |\n"),
            None
        );
        assert_eq!(virtiofsd_before("# nothing\n"), None);
        // A lone `|` is no table row (and no slice out of bounds).
        assert_eq!(table_rows("|\n| a |\n"), vec![vec!["a"]]);
    }
}
