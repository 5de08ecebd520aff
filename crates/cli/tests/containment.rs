//! End-to-end tests that play the hostile guest against the network helper and the host's
//! footprint: the guest tries gvproxy's in-network API, fills its root, and the host checks that
//! nothing of its own changed. They boot real VMs (`GATEVM_E2E=1`).

mod common;

use common::*;
use std::path::PathBuf;
use std::time::Duration;

/// What a guest process sends to gvproxy's API at the gateway: one HTTP request per JSON body,
/// each bounded by `timeout` (a dropped SYN never connects). Exits 0 only if some request got an
/// HTTP answer.
fn attack_script(bodies: &[String]) -> String {
    let mut s = String::from("answered=1\n");
    for b in bodies {
        s.push_str(&format!(
            "timeout 6 bash -c 'exec 3<>/dev/tcp/192.168.127.1/80 || exit 7; \
             printf \"POST /services/forwarder/expose HTTP/1.0\\r\\nContent-Type: application/json\\r\\nContent-Length: %d\\r\\n\\r\\n%s\" {len} '\"'\"'{b}'\"'\"' >&3; \
             head -c 200 <&3' && answered=0\n",
            len = b.len()
        ));
    }
    s.push_str("exit $answered\n");
    s
}

/// A file of the host the guest asks gvproxy to replace with a socket, in a directory anyone may
/// write (so only the confinement keeps it).
fn victim(test: &str) -> (PathBuf, tempfile::TempDir) {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::Builder::new().prefix(test).tempdir().unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let f = d.path().join("precious");
    std::fs::write(&f, "host data\n").unwrap();
    (f, d)
}

/// Whether the tests run as root (an ordinary user gets gvproxy only with
/// `--allow-host-loopback`: its loopback guard is a cgroup BPF program only root can attach).
fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The `start` arguments that select `net`: for an ordinary user gvproxy also needs
/// `--allow-host-loopback` (the confinement and the API filter under test are the same).
fn net_args(net: &str) -> Vec<&str> {
    let mut v = vec!["--net", net];
    if net == "gvproxy" && !is_root() {
        v.push("--allow-host-loopback");
    }
    v
}

fn nobody_listens(port: u16) -> bool {
    std::net::TcpListener::bind(("0.0.0.0", port)).is_ok()
}

fn hostile_guest_against(name: &'static str, net: &str) {
    let _guard = Instance(name);
    let _ = gatevm(&["delete", name, "--force"]);
    let user_port = free_port();
    let publish = format!("{user_port}:8080");
    let mut args = vec!["start", name];
    args.extend(net_args(net));
    args.extend(["-p", &publish, "--memory", "512"]);
    ok(&args);
    serve_in_guest(name, 8080);
    assert!(
        read_forward(user_port, "hello from", Duration::from_secs(20)).is_some(),
        "the user's forward works before the attack"
    );
    // The helper itself runs unprivileged (gvproxy: our confinement; passt drops to nobody).
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let st = status_of(name, net);
        let uid = field(&st, "Uid");
        assert!(
            uid.split_whitespace().all(|u| u != "0"),
            "{net} runs as root: {uid}"
        );
        if net == "gvproxy" {
            assert_eq!(field(&st, "CapEff"), "0000000000000000", "{net}: {st}");
        }
    }
    let (file, _dir) = victim(name);
    let wild = free_port();
    let bodies = [
        format!(
            r#"{{"protocol":"unix","local":"{}","remote":"tcp://192.168.127.2:9"}}"#,
            file.display()
        ),
        format!(r#"{{"local":"0.0.0.0:{wild}","remote":"192.168.127.2:8080"}}"#),
        format!(r#"{{"local":"127.0.0.1:{user_port}"}}"#),
    ];
    let unharmed = |who: &str| {
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            "host data\n",
            "{who}: the host file was touched"
        );
        assert!(
            nobody_listens(wild),
            "{who}: a listener on 0.0.0.0:{wild} appeared"
        );
        // The user's forward is still there (an unexpose would have removed it).
        assert!(
            read_forward(user_port, "hello from", Duration::from_secs(20)).is_some(),
            "{who}: the user's forward is gone after the attack"
        );
    };

    // From a container: its traffic leaves the guest through the guest's own NAT.
    if have_busybox(name) {
        let archive = _dir.path().join("image.tar");
        let mut layer = busybox_layer();
        for a in ["wget", "timeout"] {
            layer.push(symlink(&format!("bin/{a}"), "busybox"));
        }
        docker_archive_tagged(
            &archive,
            "gatevm-test/attacker:1",
            &[tar_of(&layer)],
            image_config(&[], &["sh"], &["PATH=/bin"], "/"),
        );
        ok(&["image", "import", name, archive.to_str().unwrap()]);
        for b in &bodies {
            // Not the shell's last command: as the container's PID 1, `timeout` would be exec'd
            // and its kill of the request ignored (PID 1 ignores signals it has no handler for).
            let script = format!(
                "timeout -s KILL 6 wget -q -O- --post-data='{b}' http://192.168.127.1/services/forwarder/expose; exit $?"
            );
            let out = gatevm(&[
                "run",
                name,
                "gatevm-test/attacker:1",
                "--",
                "sh",
                "-c",
                &script,
            ]);
            assert!(
                !out.status.success(),
                "the container got an answer from the API: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        unharmed("from a container");
        if net == "gvproxy" {
            let log = ok(&["logs", name, "--host=supervisor"]);
            assert!(
                log.contains("network filter: dropped a frame from the guest (GatewayService)"),
                "no drop in the supervisor log after the container's requests: {log}"
            );
        }
    }

    // From the guest itself (`gatevm exec`).
    let (code, out, err) = exec(name, &["sh", "-c", &attack_script(&bodies)], None);
    assert_ne!(code, 0, "the guest got an answer from the API: {out} {err}");
    unharmed("from the guest");
    if net == "gvproxy" {
        // The requests did not fail by accident: the filter saw them and dropped them.
        let log = ok(&["logs", name, "--host=supervisor"]);
        assert!(
            log.contains("network filter: dropped a frame from the guest (GatewayService)"),
            "no drop in the supervisor log: {log}"
        );
    }
}

#[test]
fn the_guest_cannot_reach_gvproxys_api() {
    if !enabled("the_guest_cannot_reach_gvproxys_api") {
        return;
    }
    hostile_guest_against("cont-gvproxy", "gvproxy");
    // Not with passt: see passt_runs_unprivileged_and_listens_only_on_forwards.
}

/// passt has no control plane inside the virtual network to attack, and it proxies every
/// destination through the host's own sockets: a guest connection to the gateway address would
/// leave the machine, so this test sends none. It checks what a hostile guest could gain from
/// passt instead: passt runs as another uid than root, and on the host it listens only on the
/// user's forwarded port.
#[test]
fn passt_runs_unprivileged_and_listens_only_on_forwards() {
    if !enabled("passt_runs_unprivileged_and_listens_only_on_forwards") {
        return;
    }
    let name = "cont-passt";
    let _guard = Instance(name);
    let _ = gatevm(&["delete", name, "--force"]);
    let user_port = free_port();
    ok(&[
        "start",
        name,
        "--net",
        "passt",
        "-p",
        &format!("{user_port}:8080"),
        "--memory",
        "512",
    ]);
    serve_in_guest(name, 8080);
    assert!(
        read_forward(user_port, "hello from", Duration::from_secs(20)).is_some(),
        "the user's forward works"
    );
    if is_root() {
        let st = status_of(name, "passt");
        let uid = field(&st, "Uid");
        assert!(
            uid.split_whitespace().all(|u| u != "0"),
            "passt runs as root: {uid}"
        );
    }
    if !is_root() {
        // passt makes itself non-dumpable: its /proc/PID/fd is root's, so `ss -p` run by the
        // user who started it names no process for its sockets.
        gatevm_testkit::skip_part(
            "passt_runs_unprivileged_and_listens_only_on_forwards",
            "listener",
            "needs root: passt is non-dumpable, so only root can tie its sockets to it (ss -p)",
        );
        return;
    }
    let pids: Vec<String> = processes_of(name)
        .iter()
        .filter(|l| l.contains("passt"))
        .filter_map(|l| l.split(':').next().map(str::to_string))
        .collect();
    let Ok(out) = std::process::Command::new("ss").args(["-Hltnp"]).output() else {
        gatevm_testkit::skip_part(
            "passt_runs_unprivileged_and_listens_only_on_forwards",
            "listener",
            "no ss",
        );
        return;
    };
    let listening = String::from_utf8_lossy(&out.stdout);
    let of_passt: Vec<&str> = listening
        .lines()
        .filter(|l| pids.iter().any(|p| l.contains(&format!("pid={p},"))))
        .collect();
    assert!(
        !of_passt.is_empty(),
        "no listener of passt ({pids:?}): {listening}"
    );
    for l in &of_passt {
        assert!(
            l.contains(&format!(":{user_port} ")),
            "passt listens where the user did not ask: {l}"
        );
    }
}

/// `/proc/PID/status` fields of the instance's process whose executable is named `exe`.
fn status_of(name: &str, exe: &str) -> String {
    for line in processes_of(name) {
        let pid = line.split(':').next().unwrap();
        let Ok(target) = std::fs::read_link(format!("/proc/{pid}/exe")) else {
            continue;
        };
        if target.file_name().and_then(|n| n.to_str()) == Some(exe) {
            return std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        }
    }
    panic!("no {exe} process of {name}: {:?}", processes_of(name));
}

fn field<'a>(status: &'a str, key: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or("")
        .trim()
}

#[test]
fn gvproxy_runs_unprivileged_and_confined() {
    if !enabled("gvproxy_runs_unprivileged_and_confined") {
        return;
    }
    let name = "cont-gvpriv";
    let _guard = Instance(name);
    let _ = gatevm(&["delete", name, "--force"]);
    let mut args = vec!["start", name, "--memory", "512"];
    args.extend(net_args("gvproxy"));
    ok(&args);
    let st = status_of(name, "gvproxy");
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        let uid = field(&st, "Uid");
        assert!(
            uid.split_whitespace().all(|u| u != "0"),
            "gvproxy runs as root: {uid}"
        );
    }
    assert_eq!(field(&st, "CapEff"), "0000000000000000", "{st}");
    assert_eq!(field(&st, "NoNewPrivs"), "1", "{st}");
    // Its directory is the only one it has; the instance's run directory stays private.
    let run = run_dir(name);
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&run).unwrap().mode() & 0o777, 0o700);
    assert_eq!(
        std::fs::metadata(run.join("net")).unwrap().mode() & 0o777,
        0o700
    );
    // status --json says the same.
    let st = status(name);
    let procs = st["processes"].as_array().expect("processes in status");
    let gv = procs
        .iter()
        .find(|p| p["role"] == "gvproxy")
        .unwrap_or_else(|| panic!("no gvproxy in {procs:?}"));
    assert_eq!(gv["confinement"]["no_new_privs"], true, "{gv}");
    assert_eq!(gv["confinement"]["cap_eff"], "0000000000000000", "{gv}");
    if root {
        assert_ne!(gv["confinement"]["uid"], 0, "{gv}");
    }
    let policy = gv["policy"].as_str().unwrap_or("");
    if policy.contains("no Landlock") {
        gatevm_testkit::skip_part("gvproxy_runs_unprivileged_and_confined", "Landlock", policy);
    } else {
        assert!(
            policy.contains("Landlock ABI") && policy.contains("files only in its directory"),
            "{gv}"
        );
    }
    for role in ["supervisor", "vmm"] {
        assert!(
            procs
                .iter()
                .any(|p| p["role"] == role && p["confinement"].is_object()),
            "{role} missing in {procs:?}"
        );
    }
    // The root is the VM's disks: no virtiofsd serves it.
    assert!(!procs.iter().any(|p| p["role"] == "virtiofsd"), "{procs:?}");
    assert_eq!(exec(name, &["true"], None).0, 0);
}

#[test]
fn guest_root_writes_stop_at_the_budget() {
    if !enabled("guest_root_writes_stop_at_the_budget") {
        return;
    }
    let name = "cont-budget";
    let _guard = Instance(name);
    let _ = gatevm(&["delete", name, "--force"]);
    ok(&["start", name, "--memory", "512", "--root-size", "256M"]);
    let st = status(name);
    let dir = PathBuf::from(st["logs"].as_str().unwrap())
        .parent()
        .unwrap()
        .to_path_buf();
    let img = dir.join("rootfs-rw.img");
    // The guest writes its root into this disk; the host mounts none of it.
    assert_eq!(mounts_under(&dir), Vec::<String>::new());
    assert_eq!(loop_devices_under(&dir), Vec::<String>::new());
    // The guest writes zeros to its root until the disk is full.
    let (code, out, err) = exec(
        name,
        &[
            "sh",
            "-c",
            "dd if=/dev/zero of=/fill bs=1M conv=fsync; echo \"dd=$? size=$(stat -c %s /fill)\"",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    let (rc, size) = out
        .trim()
        .strip_prefix("dd=")
        .and_then(|r| r.split_once(" size="))
        .unwrap_or_else(|| panic!("{out:?}"));
    assert_ne!(rc, "0", "dd filled no disk: {out} {err}");
    let size: u64 = size.parse().unwrap();
    // ENOSPC at about the budget: the whole 256 MiB less the file system's own (journal,
    // inode tables) and what the boot wrote (the agent's copy).
    eprintln!(
        "the guest wrote {} MiB to its root before ENOSPC",
        size >> 20
    );
    assert!(
        (200 << 20..=256 << 20).contains(&size),
        "ENOSPC after {size} bytes on a 256 MiB budget"
    );
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&img).unwrap();
    assert_eq!(meta.len(), 256 << 20, "the disk's size changed");
    let used = meta.blocks() * 512;
    assert!(
        used <= 256 << 20,
        "the host spent {used} bytes on a 256 MiB budget"
    );
    assert_eq!(mounts_under(&dir), Vec::<String>::new());
    // The guest recovers by removing its file; the instance keeps working.
    let (code, _, err) = exec(name, &["sh", "-c", "rm /fill && echo ok > /after"], None);
    assert_eq!(code, 0, "{err}");
    // Another size for an existing budget is refused without --reset.
    ok(&["stop", name]);
    fails(
        &["start", name, "--root-size", "512M"],
        "changes only with --reset",
    );
    ok(&["start", name]);
    assert_eq!(
        exec(name, &["cat", "/after"], None),
        (0, "ok\n".into(), String::new())
    );
}

/// The disk of the running instance `name` with this serial in the guest (`vda`, ...), found the
/// way stage 1 finds it.
const FIND_DISK: &str = r#"
disk=
for d in /sys/block/vd*; do
  [ "$(cat "$d/serial" 2>/dev/null)" = "$SERIAL" ] && disk=${d##*/}
done
[ -n "$disk" ] || { echo "no disk $SERIAL"; exit 3; }
echo "disk=$disk ro=$(cat /sys/block/$disk/ro)"
"#;

/// What the guest, as root, tries against a read-only disk of its own (`$SERIAL`): make the block
/// device writable, write its first block, mount its file system and remount that writable, write
/// into the mount. A `step=exit-status` word for each, and the mount's mode after the remount.
const ATTACK_DISK: &str = r#"
blockdev --setrw /dev/$disk; echo "setrw=$? getro=$(blockdev --getro /dev/$disk)"
dd if=/dev/zero of=/dev/$disk bs=4096 count=1 conv=notrunc,fsync oflag=direct; echo "dd=$?"
dd if=/dev/zero of=/dev/$disk bs=4096 count=1 seek=1 conv=notrunc,fsync; echo "dd_buffered=$?"
mkdir -p /tmp/attack-$disk
mount -t erofs -o ro /dev/$disk /tmp/attack-$disk; echo "mount=$?"
mount -o remount,rw /tmp/attack-$disk; echo "remount_rw=$?"
echo "mode=$(grep " /tmp/attack-$disk " /proc/mounts | cut -d ' ' -f 4 | cut -d , -f 1)"
touch /tmp/attack-$disk/owned; echo "touch=$?"
umount /tmp/attack-$disk
"#;

/// The `key=value` words of the attack's output.
fn attack_results(out: &str) -> std::collections::BTreeMap<String, String> {
    out.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Every write the guest tried failed; the device stayed read-only.
fn assert_disk_attack_failed(serial: &str, out: &str, err: &str) {
    let r = attack_results(out);
    let get = |k: &str| {
        r.get(k)
            .unwrap_or_else(|| panic!("{serial}: no {k} in {out:?} ({err})"))
            .as_str()
    };
    assert_eq!(get("ro"), "1", "{serial} is writable in the guest: {out}");
    // BLKROSET may be accepted (it only clears the user's own flag); no write gets through.
    for step in ["dd", "dd_buffered", "remount_rw", "touch"] {
        assert_ne!(get(step), "0", "{serial}: {step} succeeded: {out} {err}");
    }
    // The file system mounts (read-only, as stage 1 mounts it) and stays read-only.
    assert_eq!(get("mount"), "0", "{serial}: {out} {err}");
    assert_eq!(get("mode"), "ro", "{serial}: {out} {err}");
}

/// The image files the VMM of `name` holds, by whether it holds them writable.
fn vmm_images(name: &str) -> Vec<(PathBuf, bool)> {
    let pid = status(name)["vm_pid"].as_u64().expect("vm_pid in status");
    let mut v: Vec<(PathBuf, bool)> = open_files(pid)
        .into_iter()
        .filter(|(p, _)| p.extension().is_some_and(|x| x == "erofs" || x == "img"))
        .collect();
    v.sort();
    v.dedup();
    v
}

/// The guest, as root, plays against its disks: the shared base image (read-only EROFS) cannot
/// be made writable, written or remounted writable; writes to files of the base land in the
/// instance's own layer. The host holds the base open read-only, its bytes do not change, and
/// while the instance runs nothing is mounted on the host under the instance's directory.
#[test]
fn hostile_guest_cannot_write_its_base_disk() {
    if !enabled("hostile_guest_cannot_write_its_base_disk") {
        return;
    }
    let name = "cont-basedisk";
    let _guard = Instance(name);
    let _ = gatevm(&["delete", name, "--force"]);
    ok(&["start", name, "--memory", "512", "--root-size", "512M"]);
    let dir = instance_dir_of(name);

    // The host side: the VMM holds the base image read-only and the instance's disks writable;
    // no mount, no loop device of the instance's files.
    let images = vmm_images(name);
    eprintln!("the VMM's images: {images:?}");
    let bases: Vec<&PathBuf> = images
        .iter()
        .filter(|(p, _)| p.extension().is_some_and(|x| x == "erofs"))
        .map(|(p, _)| p)
        .collect();
    assert_eq!(bases.len(), 1, "{images:?}");
    let base = bases[0].clone();
    assert_eq!(
        base.parent().and_then(|p| p.file_name()),
        Some(std::ffi::OsStr::new("rootfs")),
        "the base is not set-up's image: {}",
        base.display()
    );
    // (QEMU may hold a disk twice, read-only and writable; the shared base only read-only.)
    assert!(
        images.iter().all(|(p, w)| !*w || p.starts_with(&dir)),
        "the VMM holds a shared image writable: {images:?}"
    );
    assert!(
        images.contains(&(dir.join("rootfs-rw.img"), true)),
        "{images:?}"
    );
    let before = sha256_of(&base);
    assert_eq!(mounts_under(&dir), Vec::<String>::new());
    assert_eq!(loop_devices_under(&dir), Vec::<String>::new());

    // The guest's root is the overlay on the base disk; it attacks the base.
    let script = format!("SERIAL=gatevm-base\n{FIND_DISK}{ATTACK_DISK}");
    let (code, out, err) = exec(name, &["sh", "-c", &script], None);
    eprintln!("attack on the base disk:\n{out}{err}");
    assert_eq!(code, 0, "{out} {err}");
    assert_disk_attack_failed("gatevm-base", &out, &err);
    // Stage 1's mount of the base (/lower, left behind in the initramfs) is out of the root's
    // reach; a remount there changes nothing, and no EROFS mount the guest sees is writable.
    let (code, out, err) = exec(
        name,
        &[
            "sh",
            "-c",
            "mount -o remount,rw /lower 2>/dev/null; \
             grep -c '^[^ ]* [^ ]* erofs rw' /proc/mounts; \
             echo pwned >> /usr/lib/os-release && grep -c pwned /usr/lib/os-release && sync",
        ],
        None,
    );
    // A file of the base is written through the overlay: into the instance's own layer.
    assert_eq!((code, out.as_str()), (0, "0\n1\n"), "{err}");

    // What the guest did changed nothing of the base, and the host still mounts nothing.
    assert_eq!(mounts_under(&dir), Vec::<String>::new());
    ok(&["stop", name]);
    assert_eq!(
        sha256_of(&base),
        before,
        "the guest changed {}",
        base.display()
    );
    // The write through the overlay stays the instance's own.
    ok(&["start", name]);
    assert_eq!(
        exec(name, &["grep", "-c", "pwned", "/usr/lib/os-release"], None),
        (0, "1\n".into(), String::new())
    );
    ok(&["stop", name]);
    assert_eq!(sha256_of(&base), before);
}

/// The k3s profile's staging image is a read-only disk in the guest (mounted read-only at
/// /etc/gatevm/k3s): the guest cannot change what the host staged, and the host mounts nothing.
/// A stand-in k3s (`GATEVM_FAKE_K3S`) runs in place of k3s.
#[test]
fn k3s_staging_disk_is_read_only_in_the_guest() {
    let test = "k3s_staging_disk_is_read_only_in_the_guest";
    if !enabled(test) {
        return;
    }
    let Some(fake) = std::env::var_os("GATEVM_FAKE_K3S") else {
        gatevm_testkit::skip(
            test,
            "set GATEVM_FAKE_K3S to the fake-k3s binary (scripts/test.sh builds it)",
        );
        return;
    };
    let name = "cont-k3sstage";
    let _guard = Instance(name);
    let _ = gatevm(&["delete", name, "--force"]);
    let t = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(bin())
        .args(["start", name, "--profile", "k3s", "--k3s"])
        .arg(&fake)
        .args(["--api-port", &free_port().to_string()])
        .env("KUBECONFIG", t.path().join("kubeconfig"))
        .env("XDG_CONFIG_HOME", t.path().join("config"))
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "start: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = instance_dir_of(name);
    let stage = dir.join("k3s-stage.erofs");
    assert!(
        vmm_images(name).contains(&(stage.clone(), false)),
        "the VMM does not hold {} read-only: {:?}",
        stage.display(),
        vmm_images(name)
    );
    let before = sha256_of(&stage);
    assert_eq!(mounts_under(&dir), Vec::<String>::new());

    let script = format!("SERIAL=gatevm-stage\n{FIND_DISK}{ATTACK_DISK}");
    let (code, out, err) = exec(name, &["sh", "-c", &script], None);
    eprintln!("attack on the staging disk:\n{out}{err}");
    assert_eq!(code, 0, "{out} {err}");
    assert_disk_attack_failed("gatevm-stage", &out, &err);
    // Where the guest mounted it: read-only, and k3s is there.
    let (code, out, err) = exec(
        name,
        &[
            "sh",
            "-c",
            "mount -o remount,rw /etc/gatevm/k3s; echo remount=$?; \
             touch /etc/gatevm/k3s/k3s; echo touch=$?; \
             grep ' /etc/gatevm/k3s ' /proc/mounts | cut -d ' ' -f 3,4 | cut -d , -f 1; \
             test -x /etc/gatevm/k3s/k3s && echo k3s",
        ],
        None,
    );
    assert_eq!(code, 0, "{out} {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out} {err}");
    assert_ne!(lines[0], "remount=0", "{out} {err}");
    assert_ne!(lines[1], "touch=0", "{out} {err}");
    assert_eq!(&lines[2..], ["erofs ro", "k3s"], "{out} {err}");
    assert!(err.contains("Read-only file system"), "{err}");

    ok(&["stop", name]);
    assert_eq!(
        sha256_of(&stage),
        before,
        "the guest changed {}",
        stage.display()
    );
}
