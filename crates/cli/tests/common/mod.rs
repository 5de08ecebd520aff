//! Helpers shared by the end-to-end test files (each includes this module).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn enabled(test: &str) -> bool {
    if std::env::var("GATEVM_E2E").as_deref() == Ok("1") {
        return true;
    }
    gatevm_testkit::skip(
        test,
        "set GATEVM_E2E=1 after `gatevm setup` (scripts/test.sh does both)",
    );
    false
}

pub fn bin() -> PathBuf {
    std::env::var_os("GATEVM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_gatevm")))
}

pub fn gatevm(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running gatevm")
}

/// Runs gatevm: exit code, stdout, stderr.
pub fn run_gatevm(args: &[&str]) -> (i32, String, String) {
    let out = gatevm(args);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn ok(args: &[&str]) -> String {
    let out = gatevm(args);
    assert!(
        out.status.success(),
        "gatevm {args:?} failed ({:?}): {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn fails(args: &[&str], needle: &str) {
    let out = gatevm(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "gatevm {args:?} should fail");
    assert!(
        err.contains(needle),
        "gatevm {args:?}: {err:?} lacks {needle:?}"
    );
}

pub fn status(name: &str) -> serde_json::Value {
    serde_json::from_str(&ok(&["status", name, "--json"])).expect("status JSON")
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Deletes the instance when the test ends, however it ends; after a failure it first prints the
/// end of the instance's console and supervisor logs, so CI output says what happened.
pub struct Instance(pub &'static str);
impl Drop for Instance {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for which in ["console", "supervisor"] {
                let out = gatevm(&[
                    "logs",
                    self.0,
                    if which == "console" {
                        "--console"
                    } else {
                        "--host=supervisor"
                    },
                ]);
                let text = String::from_utf8_lossy(&out.stdout);
                let lines: Vec<&str> = text.lines().collect();
                eprintln!("--- last {which} lines of {} ---", self.0);
                for l in &lines[lines.len().saturating_sub(25)..] {
                    eprintln!("{l}");
                }
            }
        }
        let _ = gatevm(&["delete", self.0, "--force"]);
    }
}

/// The instance's runtime directory, chosen as gatevm chooses it: `$GATEVM_RUN_DIR`, else
/// `$XDG_RUNTIME_DIR/gatevm`, else `/run/gatevm` for root and `/tmp/gatevm-UID` for a user.
pub fn run_dir(name: &str) -> PathBuf {
    let var = |v: &str| {
        std::env::var_os(v)
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
    };
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let base = var("GATEVM_RUN_DIR")
        .or_else(|| var("XDG_RUNTIME_DIR").map(|d| d.join("gatevm")))
        .unwrap_or_else(|| {
            if uid == 0 {
                PathBuf::from("/run/gatevm")
            } else {
                PathBuf::from(format!("/tmp/gatevm-{uid}"))
            }
        });
    base.join(name)
}

/// Processes whose command line mentions the instance (QEMU is named gatevm-NAME; helpers get
/// paths under its run directory).
pub fn processes_of(name: &str) -> Vec<String> {
    let run = run_dir(name).display().to_string() + "/";
    let tag = format!("gatevm-{name},");
    let mut found = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if !e
            .file_name()
            .to_string_lossy()
            .chars()
            .all(|c| c.is_ascii_digit())
        {
            continue;
        }
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
        // The supervisor marks every process it starts with GATEVM_INSTANCE=NAME.
        let marked = std::fs::read(e.path().join("environ")).is_ok_and(|env| {
            env.split(|b| *b == 0)
                .any(|kv| kv == format!("GATEVM_INSTANCE={name}").as_bytes())
        });
        if (cmd.contains(&run) || cmd.contains(&tag) || marked) && !cmd.contains("cargo") {
            found.push(format!("{}: {cmd}", e.file_name().to_string_lossy()));
        }
    }
    found
}

/// The lines of this process's mount table under the instance `name`'s directory.
pub fn mounts_of(name: &str) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&format!("/instances/{name}/")))
        .map(str::to_string)
        .collect()
}

pub fn assert_no_leftovers(name: &str) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let procs = processes_of(name);
        let mounts = mounts_of(name);
        let sockets: Vec<PathBuf> = std::fs::read_dir(run_dir(name))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "sock"))
                    .collect()
            })
            .unwrap_or_default();
        if procs.is_empty() && mounts.is_empty() && sockets.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "leftovers of {name}: processes {procs:?}, mounts {mounts:?}, sockets {sockets:?}"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn exec(name: &str, args: &[&str], stdin: Option<&[u8]>) -> (i32, String, String) {
    let mut full = vec!["exec", name];
    if stdin.is_some() {
        full.push("-i");
    }
    full.push("--");
    full.extend_from_slice(args);
    let mut child = Command::new(bin())
        .args(&full)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        let mut i = child.stdin.take().unwrap();
        i.write_all(input).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Serves a greeting on a guest TCP port (perl is part of every Debian root).
pub fn serve_in_guest(name: &str, port: u16) {
    let script = format!(
        "nohup perl -MIO::Socket::INET -e 'my $s = IO::Socket::INET->new(LocalPort => {port}, Listen => 5, ReuseAddr => 1) or die; while (my $c = $s->accept) {{ print $c \"hello from {name}\\n\"; close $c }}' >/dev/null 2>&1 &"
    );
    let (code, _, err) = exec(name, &["sh", "-c", &script], None);
    assert_eq!(code, 0, "{err}");
}

/// Whether a guest process can open a TCP connection to the host's loopback through gvproxy's
/// host alias, checked against a listener of this test on 127.0.0.1.
/// Whether the guest reaches a listener on the host's 127.0.0.1 through the address its network
/// helper maps there when allowed: gvproxy's NAT address, or the gateway for passt (the helper an
/// ordinary user gets by default).
pub fn guest_reaches_host_loopback(name: &str) -> bool {
    let addr = match status(name)["net"].as_str() {
        Some("passt") => "192.168.127.1",
        _ => "192.168.127.254",
    };
    guest_reaches_host_loopback_via(name, addr)
}

/// Whether the guest, connecting to `addr`, reaches a listener on the host's 127.0.0.1.
pub fn guest_reaches_host_loopback_via(name: &str, addr: &str) -> bool {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let script = format!("timeout 10 bash -c 'exec 3<>/dev/tcp/{addr}/{port}' 2>/dev/null");
    let (code, _, _) = exec(name, &["sh", "-c", &script], None);
    l.set_nonblocking(true).unwrap();
    let accepted = l.accept().is_ok();
    assert_eq!(
        code == 0,
        accepted,
        "the guest's view and the host listener disagree"
    );
    accepted
}

pub fn fetch(port: u16) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut text = String::new();
            if s.read_to_string(&mut text).is_ok() && !text.is_empty() {
                return Some(text);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

// Image archives and roots built from the host's static busybox.

pub const BUSYBOX: &str = "/usr/bin/busybox";
pub const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "ls", "nc", "sleep", "true", "false", "test", "pwd", "env", "mkdir",
    "httpd",
];

pub fn have_busybox(test: &str) -> bool {
    if Path::new(BUSYBOX).is_file() {
        return true;
    }
    gatevm_testkit::skip(
        test,
        format!("{BUSYBOX} is missing (apt-get install busybox-static)"),
    );
    false
}

/// A tar with the given entries, built with raw headers so hostile names survive.
pub fn tar_of(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        let name = e.name.as_bytes();
        h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name);
        h.set_mode(e.mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        match &e.kind {
            Kind::File(data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(data.len() as u64);
                h.set_cksum();
                b.append(&h, &data[..]).unwrap();
            }
            Kind::Dir => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                h.set_cksum();
                b.append(&h, std::io::empty()).unwrap();
            }
            Kind::Symlink(t) | Kind::Hardlink(t) => {
                h.set_entry_type(if matches!(e.kind, Kind::Symlink(_)) {
                    tar::EntryType::Symlink
                } else {
                    tar::EntryType::Link
                });
                h.set_size(0);
                let t = t.as_bytes();
                h.as_gnu_mut().unwrap().linkname[..t.len()].copy_from_slice(t);
                h.set_cksum();
                b.append(&h, std::io::empty()).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

pub struct Entry {
    pub name: String,
    pub mode: u32,
    pub kind: Kind,
}

pub enum Kind {
    File(Vec<u8>),
    Dir,
    Symlink(String),
    Hardlink(String),
}

pub fn file(name: &str, data: &[u8]) -> Entry {
    Entry {
        name: name.into(),
        mode: 0o644,
        kind: Kind::File(data.to_vec()),
    }
}

pub fn dir(name: &str) -> Entry {
    Entry {
        name: name.into(),
        mode: 0o755,
        kind: Kind::Dir,
    }
}

pub fn symlink(name: &str, target: &str) -> Entry {
    Entry {
        name: name.into(),
        mode: 0o777,
        kind: Kind::Symlink(target.into()),
    }
}

pub fn busybox_layer() -> Vec<Entry> {
    let mut v = vec![
        dir("bin/"),
        dir("etc/"),
        Entry {
            name: "bin/busybox".into(),
            mode: 0o755,
            kind: Kind::File(std::fs::read(BUSYBOX).unwrap()),
        },
    ];
    for a in APPLETS {
        v.push(symlink(&format!("bin/{a}"), "busybox"));
    }
    v
}

/// A `docker save` archive (the classic layout) with these layers and image config.
pub fn docker_archive(path: &Path, layers: &[Vec<u8>], config: serde_json::Value) {
    docker_archive_tagged(path, "gatevm-test/busybox:1", layers, config)
}

/// A `docker save` archive with one tagged image.
pub fn docker_archive_tagged(
    path: &Path,
    tag: &str,
    layers: &[Vec<u8>],
    mut config: serde_json::Value,
) {
    use sha2::Digest;
    // containerd checks unpacked layers against the config's diff IDs.
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|l| format!("sha256:{}", hex::encode(sha2::Sha256::digest(l))))
        .collect();
    config["rootfs"] = serde_json::json!({"type": "layers", "diff_ids": diff_ids});
    let mut entries = vec![];
    let mut names = vec![];
    for (i, l) in layers.iter().enumerate() {
        entries.push(dir(&format!("layer{i}/")));
        entries.push(file(&format!("layer{i}/layer.tar"), l));
        names.push(format!("layer{i}/layer.tar"));
    }
    entries.push(file("config.json", config.to_string().as_bytes()));
    let manifest = serde_json::json!([{
        "Config": "config.json",
        "RepoTags": [tag],
        "Layers": names,
    }]);
    entries.push(file("manifest.json", manifest.to_string().as_bytes()));
    std::fs::write(path, tar_of(&entries)).unwrap();
}

pub fn image_config(
    entrypoint: &[&str],
    cmd: &[&str],
    env: &[&str],
    workdir: &str,
) -> serde_json::Value {
    serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": entrypoint, "Cmd": cmd, "Env": env, "WorkingDir": workdir},
        "rootfs": {"type": "layers", "diff_ids": []},
    })
}

/// Reads from a forwarded port until `want` arrives (gvproxy accepts and closes connections while
/// the guest does not listen yet).
pub fn read_forward(port: u16, want: &str, within: Duration) -> Option<String> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let mut text = String::new();
            let mut buf = [0u8; 256];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
                text.push_str(&String::from_utf8_lossy(&buf[..n]));
                if text.contains(want) {
                    return Some(text);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

/// The instance's directory in the data directory (the parent of its logs).
pub fn instance_dir_of(name: &str) -> PathBuf {
    let st = status(name);
    PathBuf::from(st["logs"].as_str().expect("logs in status"))
        .parent()
        .expect("logs in the instance directory")
        .to_path_buf()
}

/// The lines of this process's mount table whose mount point or mounted source is `dir` or under
/// it (the instance's root is the VM's disks now: there should be none).
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let d = dir.display().to_string();
    let under = |p: &str| p == d || p.starts_with(&format!("{d}/"));
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let source = l.split(" - ").nth(1).and_then(|r| r.split(' ').nth(1));
            f.get(4).is_some_and(|m| under(m)) || source.is_some_and(under)
        })
        .map(str::to_string)
        .collect()
}

/// Loop devices of the host whose backing file is in `dir`.
pub fn loop_devices_under(dir: &Path) -> Vec<String> {
    let d = dir.display().to_string();
    std::fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let back = std::fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
            back.trim()
                .starts_with(&format!("{d}/"))
                .then(|| format!("{}: {}", e.file_name().to_string_lossy(), back.trim()))
        })
        .collect()
}

/// The SHA-256 of a file, in hex (sha256sum: a debug build hashes hundreds of MiB slowly).
pub fn sha256_of(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success(), "sha256sum {}", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// The files process `pid` holds open, with whether each is open for writing.
pub fn open_files(pid: u64) -> Vec<(PathBuf, bool)> {
    let mut v = vec![];
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        let fd = e.file_name().to_string_lossy().into_owned();
        let Ok(info) = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")) else {
            continue;
        };
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|f| i64::from_str_radix(f.trim(), 8).ok())
            .unwrap_or(0);
        v.push((
            target,
            flags & i64::from(libc::O_ACCMODE) != i64::from(libc::O_RDONLY),
        ));
    }
    v
}
