//! What the supervisor records about a running instance (`state.json`): its phase, the identity
//! of its processes, timings and why it stopped.

use serde::{Deserialize, Serialize};

/// Lifecycle phase of an instance, as recorded by its supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Starting,
    Running,
    Stopping,
    Stopped,
}

/// A process owned by the supervisor, identified by pid, start time and the host's boot (so a
/// recycled pid, also one of a later boot that happens to have the same start time, is not
/// mistaken for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcId {
    pub pid: u32,
    /// Start time in clock ticks since boot (field 22 of /proc/PID/stat).
    pub start_ticks: u64,
    /// The host's boot id when the process was recorded (`/proc/sys/kernel/random/boot_id`).
    /// A record without one (written by an older gatevm) never matches a live process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<BootId>,
}

/// The kernel's random id of the current boot, a UUID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootId(pub [u8; 16]);

const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

impl BootId {
    /// The current boot's id; None where the kernel does not say.
    pub fn current() -> Option<BootId> {
        std::fs::read_to_string(BOOT_ID_PATH)
            .ok()
            .and_then(|s| BootId::parse(&s))
    }

    /// Parses a UUID (with or without dashes, surrounding whitespace ignored).
    pub fn parse(s: &str) -> Option<BootId> {
        let hex: Vec<u8> = s.trim().bytes().filter(|b| *b != b'-').collect();
        if hex.len() != 32 {
            return None;
        }
        let mut out = [0u8; 16];
        for (i, pair) in hex.chunks(2).enumerate() {
            let text = std::str::from_utf8(pair).ok()?;
            out[i] = u8::from_str_radix(text, 16).ok()?;
        }
        Some(BootId(out))
    }
}

impl std::fmt::Display for BootId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl Serialize for BootId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for BootId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<BootId, D::Error> {
        let s = String::deserialize(d)?;
        BootId::parse(&s).ok_or_else(|| serde::de::Error::custom("not a boot id (a UUID)"))
    }
}

impl ProcId {
    /// The identity of a live process.
    pub fn of(pid: u32) -> Option<ProcId> {
        Some(ProcId {
            pid,
            start_ticks: proc_start_ticks(pid)?,
            boot_id: BootId::current(),
        })
    }

    /// Whether this exact process still exists (and is not a zombie): same pid, same start time,
    /// and recorded during this boot of the host.
    pub fn alive(&self) -> bool {
        if self.boot_id != BootId::current() {
            return false;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) else {
            return false;
        };
        match parse_stat(&stat) {
            Some((state, ticks)) => ticks == self.start_ticks && state != 'Z' && state != 'X',
            None => false,
        }
    }
}

/// (state char, start ticks) from a /proc/PID/stat line; the command name may contain spaces and
/// parentheses, so fields are counted after the last ')'.
fn parse_stat(stat: &str) -> Option<(char, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // After the state (field 3) comes field 4; start time is field 22 -> 18 further.
    let ticks = fields.nth(18)?.parse().ok()?;
    Some((state, ticks))
}

fn proc_start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat).map(|(_, t)| t)
}

/// What the supervisor records in `state.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateFile {
    pub phase: Phase,
    pub supervisor: Option<ProcId>,
    pub vmm: Option<ProcId>,
    pub helpers: Vec<(String, ProcId)>,
    /// Confinement a process got that `/proc` does not show, by role (gvproxy's Landlock rules).
    #[serde(default)]
    pub policies: Vec<(String, String)>,
    /// Which backend and acceleration run the VM (`qemu/tcg`, ...).
    pub backend: Option<String>,
    /// Which kernel the VM boots (a path, or libkrunfw's).
    #[serde(default)]
    pub kernel: Option<String>,
    /// Why the backend is not the one `--vmm auto` would pick first (krun failed to boot here).
    #[serde(default)]
    pub backend_note: Option<String>,
    /// Unix time in milliseconds when the start began.
    pub started_at_ms: Option<u64>,
    /// Milliseconds from start to the guest agent answering.
    pub agent_ready_ms: Option<u64>,
    /// Milliseconds from start to the payload being ready.
    pub ready_ms: Option<u64>,
    /// Why the instance is stopped, when it did not stop on request.
    pub last_error: Option<String>,
    /// How the last run ended.
    pub stop_reason: Option<String>,
}

impl StateFile {
    /// The record of a stopped instance, with why it stopped.
    pub fn stopped(reason: Option<String>) -> StateFile {
        StateFile {
            phase: Phase::Stopped,
            supervisor: None,
            vmm: None,
            helpers: vec![],
            policies: vec![],
            backend: None,
            kernel: None,
            backend_note: None,
            started_at_ms: None,
            agent_ready_ms: None,
            ready_ms: None,
            last_error: None,
            stop_reason: reason,
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing() {
        let line =
            "123 (a) b) c) S 1 123 123 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10";
        assert_eq!(parse_stat(line), Some(('S', 98765)));
        assert_eq!(parse_stat("garbage"), None);
        let me = ProcId::of(std::process::id()).unwrap();
        assert!(me.alive());
        assert!(!ProcId {
            start_ticks: me.start_ticks + 1,
            ..me
        }
        .alive());
    }

    #[test]
    fn boot_id_is_part_of_the_identity() {
        let me = ProcId::of(std::process::id()).unwrap();
        let Some(now) = me.boot_id else {
            gatevm_testkit::skip(
                "state::tests::boot_id_is_part_of_the_identity",
                format!("this kernel has no {BOOT_ID_PATH}"),
            );
            return;
        };
        assert!(me.alive());
        // The same pid and start time recorded in another boot is not this process.
        let mut other = now;
        other.0[0] ^= 1;
        assert!(!ProcId {
            boot_id: Some(other),
            ..me
        }
        .alive());
        // Nor is a record that does not say which boot it is from.
        assert!(!ProcId {
            boot_id: None,
            ..me
        }
        .alive());
        // Round trip through the state file's JSON, as the kernel writes it.
        let text = std::fs::read_to_string(BOOT_ID_PATH).unwrap();
        let json = serde_json::to_string(&me).unwrap();
        assert!(json.contains(text.trim()), "{json}");
        let back: ProcId = serde_json::from_str(&json).unwrap();
        assert_eq!(back, me);
        assert!(serde_json::from_str::<ProcId>(
            r#"{"pid":1,"start_ticks":2,"boot_id":"not-a-uuid"}"#
        )
        .is_err());
        assert_eq!(
            BootId::parse("00112233445566778899aabbccddeeff").map(|b| b.to_string()),
            Some("00112233-4455-6677-8899-aabbccddeeff".into())
        );
    }
}
