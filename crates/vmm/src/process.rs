//! What a host process of an instance runs as: its uid, capabilities and sandboxing, read from
//! `/proc`. `status --json` reports it for the VMM and each helper.

use serde::{Deserialize, Serialize};
use std::path::Path;

/// How a process is confined, as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessConfinement {
    /// Real uid and gid.
    pub uid: u32,
    pub gid: u32,
    /// Effective uid.
    pub euid: u32,
    /// `NoNewPrivs` is set.
    pub no_new_privs: bool,
    /// The seccomp mode: `disabled`, `strict` or `filter`.
    pub seccomp: String,
    /// Effective capabilities, as the 16 hex digits of `CapEff`.
    pub cap_eff: String,
    /// Bounding set, as the 16 hex digits of `CapBnd`.
    pub cap_bnd: String,
    /// The process has a mount namespace other than the caller's.
    pub own_mount_namespace: bool,
}

/// Errors reading a process's confinement.
#[derive(Debug, thiserror::Error)]
pub enum ConfinementError {
    #[error("reading {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} has no usable {field} line")]
    Field { path: String, field: &'static str },
}

/// Parses the fields of a `/proc/PID/status` text (`path` names it in errors);
/// `own_mount_namespace` is left false.
pub fn parse_status(text: &str, path: &str) -> Result<ProcessConfinement, ConfinementError> {
    let field = |name: &'static str| -> Result<&str, ConfinementError> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
            .ok_or(ConfinementError::Field {
                path: path.to_string(),
                field: name,
            })
    };
    let bad = |name: &'static str| ConfinementError::Field {
        path: path.to_string(),
        field: name,
    };
    let ids = |name: &'static str| -> Result<Vec<u32>, ConfinementError> {
        field(name)?
            .split_whitespace()
            .map(|v| v.parse().map_err(|_| bad(name)))
            .collect()
    };
    let uids = ids("Uid")?;
    let gids = ids("Gid")?;
    let (Some(&uid), Some(&euid), Some(&gid)) = (uids.first(), uids.get(1), gids.first()) else {
        return Err(bad("Uid"));
    };
    // NoNewPrivs appeared in Linux 4.10, Seccomp in 3.8: absent counts as off.
    let no_new_privs = field("NoNewPrivs").map(|v| v == "1").unwrap_or(false);
    let seccomp = match field("Seccomp").unwrap_or("0") {
        "0" => "disabled",
        "1" => "strict",
        "2" => "filter",
        _ => return Err(bad("Seccomp")),
    }
    .to_string();
    let hex = |name: &'static str| -> Result<String, ConfinementError> {
        let v = field(name)?;
        if v.len() == 16 && v.bytes().all(|b| b.is_ascii_hexdigit()) {
            Ok(v.to_ascii_lowercase())
        } else {
            Err(bad(name))
        }
    };
    Ok(ProcessConfinement {
        uid,
        gid,
        euid,
        no_new_privs,
        seccomp,
        cap_eff: hex("CapEff")?,
        cap_bnd: hex("CapBnd")?,
        own_mount_namespace: false,
    })
}

/// The confinement of process `pid` (its main thread), compared with the calling process.
pub fn confinement(pid: u32) -> Result<ProcessConfinement, ConfinementError> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).map_err(|source| ConfinementError::Read {
        path: path.clone(),
        source,
    })?;
    let mut c = parse_status(&text, &path)?;
    let ns = |p: &str| {
        std::fs::read_link(Path::new(p)).map_err(|source| ConfinementError::Read {
            path: p.to_string(),
            source,
        })
    };
    c.own_mount_namespace = ns(&format!("/proc/{pid}/ns/mnt"))? != ns("/proc/self/ns/mnt")?;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process() {
        let me = confinement(std::process::id()).unwrap();
        // SAFETY: getuid/geteuid have no preconditions.
        let (uid, euid) = unsafe { (libc::getuid(), libc::geteuid()) };
        assert_eq!((me.uid, me.euid), (uid, euid));
        assert!(!me.own_mount_namespace);
        assert_eq!(me.cap_eff.len(), 16);
    }

    #[test]
    fn a_child_with_no_new_privs_and_a_seccomp_filter() {
        use std::os::unix::process::CommandExt;
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("5");
        // SAFETY: prctl is async-signal-safe; the filter is a valid one-instruction program
        // (allow everything) that lives for the call.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let mut allow = [libc::sock_filter {
                    code: (libc::BPF_RET | libc::BPF_K) as u16,
                    jt: 0,
                    jf: 0,
                    k: libc::SECCOMP_RET_ALLOW,
                }];
                let prog = libc::sock_fprog {
                    len: 1,
                    filter: allow.as_mut_ptr(),
                };
                if libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &prog) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().unwrap();
        let c = confinement(child.id()).unwrap();
        let _ = child.kill();
        let _ = child.wait();
        assert!(c.no_new_privs, "{c:?}");
        assert_eq!(c.seccomp, "filter");
        assert!(!c.own_mount_namespace);
        assert!(confinement(u32::MAX).is_err());
    }

    #[test]
    fn status_parsing() {
        let t = "Name:\tqemu\nUid:\t65534\t65534\t65534\t65534\nGid:\t65534\t65534\t65534\t65534\n\
                 NoNewPrivs:\t1\nSeccomp:\t2\nCapEff:\t0000000000000000\nCapBnd:\t000001FFffffffff\n";
        let c = parse_status(t, "x").unwrap();
        assert_eq!(
            (c.uid, c.gid, c.euid, c.no_new_privs),
            (65534, 65534, 65534, true)
        );
        assert_eq!(
            (c.seccomp.as_str(), c.cap_eff.as_str()),
            ("filter", "0000000000000000")
        );
        assert_eq!(c.cap_bnd, "000001ffffffffff");
        assert!(parse_status("Uid:\tx\n", "x").is_err());
        assert!(parse_status(&t.replace("Seccomp:\t2", "Seccomp:\t9"), "x").is_err());
        assert!(parse_status(&t.replace("CapEff:\t0000000000000000", "CapEff:\t0"), "x").is_err());
    }
}
