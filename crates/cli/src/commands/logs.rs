//! `gatevm logs`

use anyhow::bail;
use gatevm_abi::ExecRequest;
use gatevm_instance::client;
use std::io::{Read, Seek, SeekFrom, Write};
use std::time::Duration;

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Instance name.
    #[arg(default_value = super::DEFAULT_NAME)]
    name: String,
    /// Keep printing new lines as they come.
    #[arg(short, long)]
    follow: bool,
    /// Show the guest console (kernel and init messages) instead of containerd's log. Works on a
    /// stopped instance too, to see why it stopped.
    #[arg(long, conflicts_with = "host")]
    console: bool,
    /// Show one of the host-side logs instead: supervisor, gvproxy or passt (the network helper), or vmm.
    #[arg(long, value_parser = ["supervisor", "gvproxy", "passt", "vmm"])]
    host: Option<String>,
}

pub(crate) fn run(a: Args) -> anyhow::Result<i32> {
    let name = super::name_arg(&a.name)?.to_string();
    let paths = client::existing(&name)?;
    if let Some(which) = a.console.then_some("console").or(a.host.as_deref()) {
        return follow_file(&paths, &paths.log(which), a.follow);
    }
    if !client::is_running(&paths) {
        bail!("instance {name:?} is not running (start it with `gatevm start {name}`; `--console` shows the last boot)");
    }
    let mut argv = vec!["tail".to_string(), "-n".into(), "+1".into()];
    if a.follow {
        argv.push("-F".into());
    }
    argv.push("/var/log/containerd.log".into());
    let req = ExecRequest {
        argv,
        env: vec![],
        cwd: None,
        tty: false,
        rows: 0,
        cols: 0,
        stdin: false,
    };
    super::exec::run_exec(&name, req)
}

/// Prints a host-side log file (its previous generation `NAME.log.1` first, when there is one),
/// and with `follow` keeps printing while the instance runs, across the supervisor's rotations.
fn follow_file(
    paths: &gatevm_instance::InstancePaths,
    file: &std::path::Path,
    follow: bool,
) -> anyhow::Result<i32> {
    use std::os::unix::fs::MetadataExt;
    let read_err = |e: std::io::Error| anyhow::anyhow!("reading {}: {e}", file.display());
    let open = || -> anyhow::Result<Option<std::fs::File>> {
        match std::fs::File::open(file) {
            Ok(f) => {
                if !f.metadata().map_err(read_err)?.is_file() {
                    bail!("{} is not a file", file.display());
                }
                Ok(Some(f))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(read_err(e)),
        }
    };
    let old = gatevm_instance::logcap::previous_generation(file);
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; 64 * 1024];
    let mut current = open()?;
    match std::fs::File::open(&old) {
        Ok(mut f) if f.metadata().is_ok_and(|m| m.is_file()) => {
            std::io::copy(&mut f, &mut out).map_err(read_err)?;
        }
        Ok(_) => bail!("{} is not a file", old.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if current.is_none() {
                bail!("no log yet at {}", file.display())
            }
        }
        Err(e) => bail!("reading {}: {e}", old.display()),
    }
    loop {
        let n = match current.as_mut() {
            Some(f) => f.read(&mut buf).map_err(read_err)?,
            None => 0,
        };
        if n > 0 {
            out.write_all(&buf[..n])?;
            continue;
        }
        out.flush()?;
        if !follow || !client::is_running(paths) {
            return Ok(0);
        }
        std::thread::sleep(Duration::from_millis(200));
        // Rotated: the file we read is now NAME.log.1 (read to its end above, and once more
        // here for what came in meanwhile); go on with the new NAME.log from its start.
        let now = std::fs::metadata(file).ok();
        let ours = current.as_ref().and_then(|f| f.metadata().ok());
        match (now, ours) {
            (Some(now), Some(ours)) if (now.dev(), now.ino()) != (ours.dev(), ours.ino()) => {
                if let Some(f) = current.as_mut() {
                    std::io::copy(f, &mut out).map_err(read_err)?;
                }
                current = open()?;
            }
            // A truncated file starts over.
            (Some(now), Some(_)) => {
                if let Some(f) = current.as_mut() {
                    if now.len() < f.stream_position().map_err(read_err)? {
                        f.seek(SeekFrom::Start(0)).map_err(read_err)?;
                    }
                }
            }
            (Some(_), None) => current = open()?,
            _ => {}
        }
    }
}
