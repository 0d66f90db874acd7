//! The result: markdown sections plus the list of targets with PASS/MISS.

use std::fmt::Write as _;

pub struct Target {
    pub name: String,
    pub measured: String,
    pub limit: String,
    pub pass: Option<bool>,
    /// The 95% confidence interval of the measured figure spans the limit: the verdict is noise.
    pub within_noise: bool,
}

#[derive(Default)]
pub struct Report {
    pub header: Vec<String>,
    pub sections: Vec<String>,
    pub targets: Vec<Target>,
    pub notes: Vec<String>,
}

impl Report {
    pub fn section(&mut self, text: String) {
        self.sections.push(text);
    }

    /// A target; `pass == None` when it could not be measured.
    pub fn target(&mut self, name: impl Into<String>, measured: impl Into<String>, limit: &str, pass: Option<bool>) {
        self.targets.push(Target {
            name: name.into(),
            measured: measured.into(),
            limit: limit.to_owned(),
            pass,
            within_noise: false,
        });
    }

    /// Marks the last target as decided by noise (its 95% CI spans the limit).
    pub fn within_noise(&mut self, yes: bool) {
        if let Some(t) = self.targets.last_mut() {
            t.within_noise = yes;
        }
    }

    pub fn note(&mut self, text: impl Into<String>) {
        self.notes.push(text.into());
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for line in &self.header {
            let _ = writeln!(out, "{line}");
        }
        out.push('\n');
        for section in &self.sections {
            out.push_str(section.trim_end());
            out.push_str("\n\n");
        }
        let _ = writeln!(out, "## Targets (medians)\n");
        let _ = writeln!(out, "| target | measured | limit | result |");
        let _ = writeln!(out, "|---|---|---|---|");
        for t in &self.targets {
            let result = match (t.pass, t.within_noise) {
                (Some(true), false) => "PASS",
                (Some(false), false) => "**MISS**",
                (Some(true), true) => "PASS (within noise: 95% CI spans the limit)",
                (Some(false), true) => "**MISS** (within noise: 95% CI spans the limit)",
                (None, _) => "not measured",
            };
            let _ = writeln!(out, "| {} | {} | {} | {result} |", t.name, t.measured, t.limit);
        }
        let passed = self.targets.iter().filter(|t| t.pass == Some(true)).count();
        let missed = self.targets.iter().filter(|t| t.pass == Some(false)).count();
        let _ =
            writeln!(out, "\n{passed} passed, {missed} missed, {} not measured.", self.targets.len() - passed - missed);
        if !self.notes.is_empty() {
            let _ = writeln!(out, "\nNotes:");
            for n in &self.notes {
                let _ = writeln!(out, "- {n}");
            }
        }
        out
    }
}

/// A markdown table from a header row and rows.
pub fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "| {} |", head.join(" | "));
    let _ = writeln!(out, "|{}", "---|".repeat(head.len()));
    for row in rows {
        let _ = writeln!(out, "| {} |", row.join(" | "));
    }
    out
}
