//! Markdown tables and the sections of the report; the same text is printed and written to
//! docs/benchmarks.md.

use std::fmt::Write as _;

/// Column alignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    /// Text.
    Left,
    /// Numbers.
    Right,
}

/// A table with a header row, padded so it also reads well as plain text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    headers: Vec<String>,
    align: Vec<Align>,
    rows: Vec<Vec<String>>,
}

fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace(['\n', '\r'], " ")
}

impl Table {
    /// A table with these columns.
    pub fn new(columns: &[(&str, Align)]) -> Table {
        Table {
            headers: columns.iter().map(|(h, _)| cell(h)).collect(),
            align: columns.iter().map(|(_, a)| *a).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells are left empty, extra cells dropped.
    pub fn row<S: AsRef<str>>(&mut self, cells: &[S]) {
        let mut r: Vec<String> = cells.iter().map(|c| cell(c.as_ref())).collect();
        r.resize(self.headers.len(), String::new());
        self.rows.push(r);
    }

    /// Number of rows (without the header).
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether the table has no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table in Markdown, one line per row, ending with a newline.
    pub fn render(&self) -> String {
        let width = |i: usize| {
            self.rows
                .iter()
                .map(|r| r[i].chars().count())
                .chain([self.headers[i].chars().count(), 3])
                .max()
                .unwrap_or(3)
        };
        let widths: Vec<usize> = (0..self.headers.len()).map(width).collect();
        let line = |cells: &[String]| {
            let mut s = String::from("|");
            for ((c, w), a) in cells.iter().zip(&widths).zip(&self.align) {
                let _ = match a {
                    Align::Left => write!(s, " {c:<w$} |"),
                    Align::Right => write!(s, " {c:>w$} |"),
                };
            }
            s.push('\n');
            s
        };
        let mut out = line(&self.headers);
        out.push('|');
        for (w, a) in widths.iter().zip(&self.align) {
            match a {
                Align::Left => out.push_str(&format!(" {} |", "-".repeat(*w))),
                Align::Right => out.push_str(&format!(" {}: |", "-".repeat(w - 1))),
            }
        }
        out.push('\n');
        for r in &self.rows {
            out.push_str(&line(r));
        }
        out
    }
}

/// A number with as many decimals as it needs to show about three significant digits.
pub fn num(x: f64) -> String {
    if !x.is_finite() {
        "n/a".to_string()
    } else if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

/// A ratio as `1.23x`.
pub fn times(r: Option<f64>) -> String {
    match r {
        Some(r) => format!("{r:.2}x"),
        None => "n/a".to_string(),
    }
}

/// Whether a target was met.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Measured and within the target.
    Met,
    /// Measured and outside the target.
    Missed,
    /// Not measured; the reason.
    NotMeasured(String),
}

impl Verdict {
    /// `Met` when `ok`, else `Missed`.
    pub fn of(ok: bool) -> Verdict {
        if ok {
            Verdict::Met
        } else {
            Verdict::Missed
        }
    }

    /// The word in the tables.
    pub fn word(&self) -> String {
        match self {
            Verdict::Met => "met".to_string(),
            Verdict::Missed => "MISSED".to_string(),
            Verdict::NotMeasured(why) => format!("not measured ({why})"),
        }
    }
}

/// One target of a section and how the run did against it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The target, e.g. `agent ready <= 1.3x bare boot`.
    pub what: String,
    /// What was measured, e.g. `1.12x (3400 / 3030 ms)`.
    pub measured: String,
    /// The verdict.
    pub verdict: Verdict,
}

/// One case's part of the report.
#[derive(Debug, Clone, Default)]
pub struct Section {
    /// Heading.
    pub title: String,
    /// Paragraphs before the tables.
    pub intro: Vec<String>,
    /// The measurements.
    pub tables: Vec<Table>,
    /// Targets and verdicts.
    pub targets: Vec<Target>,
    /// Bullet points after the tables.
    pub notes: Vec<String>,
}

impl Section {
    /// The section in Markdown, starting with a `##` heading.
    pub fn render(&self) -> String {
        let mut s = format!("## {}\n\n", self.title);
        for p in &self.intro {
            s.push_str(p);
            s.push_str("\n\n");
        }
        for t in &self.tables {
            s.push_str(&t.render());
            s.push('\n');
        }
        if !self.targets.is_empty() {
            let mut t = Table::new(&[
                ("target", Align::Left),
                ("measured", Align::Left),
                ("verdict", Align::Left),
            ]);
            for g in &self.targets {
                t.row(&[g.what.clone(), g.measured.clone(), g.verdict.word()]);
            }
            s.push_str("Targets:\n\n");
            s.push_str(&t.render());
            s.push('\n');
        }
        for n in &self.notes {
            s.push_str("- ");
            s.push_str(n);
            s.push('\n');
        }
        if !self.notes.is_empty() {
            s.push('\n');
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_padded_and_aligned() {
        let mut t = Table::new(&[("case", Align::Left), ("median (ms)", Align::Right)]);
        t.row(&["bare QEMU boot", "812"]);
        t.row(&["gatevm start", "5400"]);
        assert_eq!(
            t.render(),
            "| case           | median (ms) |\n\
             | -------------- | ----------: |\n\
             | bare QEMU boot |         812 |\n\
             | gatevm start   |        5400 |\n"
        );
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn narrow_columns_are_three_wide_and_cells_are_escaped() {
        let mut t = Table::new(&[("a", Align::Left), ("b", Align::Right)]);
        t.row(&["x|y"]);
        t.row(&["1", "2", "extra"]);
        assert_eq!(
            t.render(),
            "| a    |   b |\n\
             | ---- | --: |\n\
             | x\\|y |     |\n\
             | 1    |   2 |\n"
        );
    }

    #[test]
    fn numbers_keep_about_three_digits() {
        assert_eq!(num(5432.4), "5432");
        assert_eq!(num(123.6), "124");
        assert_eq!(num(12.34), "12.3");
        assert_eq!(num(1.234), "1.23");
        assert_eq!(num(f64::NAN), "n/a");
        assert_eq!(times(Some(1.234)), "1.23x");
        assert_eq!(times(None), "n/a");
    }

    #[test]
    fn section_with_targets_and_notes() {
        let mut t = Table::new(&[("k", Align::Left)]);
        t.row(&["v"]);
        let s = Section {
            title: "Boot".into(),
            intro: vec!["Intro.".into()],
            tables: vec![t],
            targets: vec![
                Target {
                    what: "agent ready <= 1.3x bare".into(),
                    measured: "1.10x".into(),
                    verdict: Verdict::of(true),
                },
                Target {
                    what: "exec <= 0.25x ssh".into(),
                    measured: "-".into(),
                    verdict: Verdict::NotMeasured("no ssh baseline".into()),
                },
            ],
            notes: vec!["A note.".into()],
        };
        let md = s.render();
        assert!(md.starts_with("## Boot\n\nIntro.\n\n| k   |\n| --- |\n| v   |\n\nTargets:\n\n"));
        assert!(md.contains("| agent ready <= 1.3x bare | 1.10x    | met"));
        assert!(md.contains("| not measured (no ssh baseline) |"));
        assert!(md.ends_with("- A note.\n\n"));
        assert_eq!(Verdict::of(false).word(), "MISSED");
    }
}
