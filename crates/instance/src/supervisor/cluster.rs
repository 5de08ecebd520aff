//! The cluster network: a private Ethernet segment between the VMs of one k3s cluster (a server
//! instance and the agents that joined it), so flannel's VXLAN and node-to-node traffic go from
//! VM to VM and never through the host's network stack.
//!
//! Why a switch in the server's supervisor: each VM's cluster NIC is a QEMU `dgram` netdev on one
//! end of a `SOCK_DGRAM` socket pair (each datagram one frame); QEMU's own multi-VM netdevs are
//! multicast UDP (frames on the host's network) or point-to-point. The server's supervisor holds
//! its VM's other end and a listening socket in its run directory (owner only); an agent's
//! supervisor holds its VM's other end and relays frames over a stream connection to that
//! socket, each frame prefixed with its length (u16, big-endian). The switch floods every frame
//! to every other port (a hub: a cluster has a handful of nodes). An agent whose server goes away
//! keeps its VM's link and reconnects once the server is back.
//!
//! What a hostile guest can do here: send frames to the other VMs of its cluster (what their
//! L2 network is for), never to the host. Frames are at most 65535 bytes; each port has a bounded
//! queue, and a frame for a full queue is dropped, as a switch does.

use super::AbortOnDrop;
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixDatagram, UnixListener, UnixStream};
use tokio::sync::mpsc;

/// The largest frame (the length prefix is a u16).
pub(crate) const MAX_FRAME: usize = u16::MAX as usize;
/// Frames queued per port before new ones are dropped.
const PORT_QUEUE: usize = 512;

/// A socket pair for a VM's cluster NIC: the VM's end (inherited by the VMM) and the
/// supervisor's.
pub(crate) fn vm_pair() -> std::io::Result<(OwnedFd, UnixDatagram)> {
    let (vm, ours) = std::os::unix::net::UnixDatagram::pair()?;
    ours.set_nonblocking(true)?;
    Ok((OwnedFd::from(vm), UnixDatagram::from_std(ours)?))
}

/// The ports of a switch, by id, each with its queue.
#[derive(Default)]
struct Ports {
    next: u64,
    queues: HashMap<u64, mpsc::Sender<Vec<u8>>>,
}

impl Ports {
    fn add(ports: &Mutex<Ports>) -> (u64, mpsc::Receiver<Vec<u8>>) {
        let (tx, rx) = mpsc::channel(PORT_QUEUE);
        let mut p = ports.lock().unwrap_or_else(|e| e.into_inner());
        p.next += 1;
        let id = p.next;
        p.queues.insert(id, tx);
        (id, rx)
    }

    fn remove(ports: &Mutex<Ports>, id: u64) {
        ports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .queues
            .remove(&id);
    }

    /// Floods a frame from `from` to every other port (dropped where a queue is full).
    fn flood(ports: &Mutex<Ports>, from: u64, frame: &[u8]) {
        let p = ports.lock().unwrap_or_else(|e| e.into_inner());
        for (id, q) in &p.queues {
            if *id != from {
                let _ = q.try_send(frame.to_vec());
            }
        }
    }
}

/// Reads one length-prefixed frame; None at the end of the stream or on a bad length.
async fn read_frame(r: &mut (impl AsyncReadExt + Unpin), buf: &mut Vec<u8>) -> Option<()> {
    let len = r.read_u16().await.ok()? as usize;
    if len == 0 {
        return None;
    }
    buf.resize(len, 0);
    r.read_exact(buf).await.ok()?;
    Some(())
}

/// Writes one length-prefixed frame.
async fn write_frame(w: &mut (impl AsyncWriteExt + Unpin), frame: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(frame.len()).map_err(|_| std::io::Error::other("frame too large"))?;
    let mut out = Vec::with_capacity(frame.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(frame);
    w.write_all(&out).await
}

/// Serves one port of a datagram socket (a VM's end) on the switch until the socket fails.
async fn serve_dgram(ports: Arc<Mutex<Ports>>, sock: Arc<UnixDatagram>) {
    let (id, mut rx) = Ports::add(&ports);
    let writer = {
        let sock = sock.clone();
        tokio::spawn(async move {
            while let Some(f) = rx.recv().await {
                // A VM that is gone or not reading: the frame is lost, as on a wire.
                let _ = sock.send(&f).await;
            }
        })
    };
    let mut buf = vec![0u8; MAX_FRAME];
    while let Ok(n) = sock.recv(&mut buf).await {
        if n > 0 {
            Ports::flood(&ports, id, &buf[..n]);
        }
    }
    Ports::remove(&ports, id);
    writer.abort();
}

/// Serves one agent's connection on the switch until it ends.
async fn serve_stream(ports: Arc<Mutex<Ports>>, stream: UnixStream) {
    let (id, mut rx) = Ports::add(&ports);
    let (mut r, mut w) = stream.into_split();
    let writer = tokio::spawn(async move {
        while let Some(f) = rx.recv().await {
            if write_frame(&mut w, &f).await.is_err() {
                break;
            }
        }
    });
    let mut buf = Vec::new();
    while read_frame(&mut r, &mut buf).await.is_some() {
        Ports::flood(&ports, id, &buf);
    }
    Ports::remove(&ports, id);
    writer.abort();
}

/// Starts a cluster server's switch: its own VM's port (`own`) and a listener at `socket`
/// (0600) for the agents' supervisors. Ends when dropped.
pub(crate) fn start_switch(own: UnixDatagram, socket: &Path) -> std::io::Result<AbortOnDrop> {
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    }
    let ports = Arc::new(Mutex::new(Ports::default()));
    Ok(AbortOnDrop(tokio::spawn(async move {
        // Aborted with this task: the switch ends with the supervisor's start.
        let _own_port = AbortOnDrop(tokio::spawn(serve_dgram(ports.clone(), Arc::new(own))));
        let mut agents = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((s, _)) => {
                        agents.spawn(serve_stream(ports.clone(), s));
                    }
                    Err(e) => {
                        tracing::warn!("cluster switch: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                },
                Some(_) = agents.join_next() => {}
            }
        }
    })))
}

/// Starts an agent's relay between its VM's port (`own`) and its server's switch at
/// `server_socket`, reconnecting every second while the server is away (frames from the VM are
/// dropped meanwhile). Ends when dropped.
pub(crate) fn start_relay(own: UnixDatagram, server_socket: PathBuf) -> AbortOnDrop {
    let own = Arc::new(own);
    AbortOnDrop(tokio::spawn(async move {
        let mut buf = vec![0u8; MAX_FRAME];
        let mut said = false;
        loop {
            let stream = tokio::select! {
                s = UnixStream::connect(&server_socket) => s,
                // While there is no server, the VM's frames are read and dropped.
                _ = own.recv(&mut buf) => continue,
            };
            let Ok(stream) = stream else {
                if !said {
                    tracing::info!(
                        "cluster network: the server's switch {} is not there; retrying",
                        server_socket.display()
                    );
                    said = true;
                }
                drain_for(&own, &mut buf, Duration::from_secs(1)).await;
                continue;
            };
            tracing::info!("cluster network: connected to {}", server_socket.display());
            said = false;
            let (mut r, mut w) = stream.into_split();
            let from_switch = {
                let own = own.clone();
                tokio::spawn(async move {
                    let mut f = Vec::new();
                    while read_frame(&mut r, &mut f).await.is_some() {
                        let _ = own.send(&f).await;
                    }
                })
            };
            tokio::pin!(from_switch);
            loop {
                tokio::select! {
                    _ = &mut from_switch => break,
                    got = own.recv(&mut buf) => match got {
                        Ok(n) if n > 0 => {
                            if write_frame(&mut w, &buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        Ok(_) => {}
                        Err(_) => return,
                    },
                }
            }
            from_switch.abort();
            tracing::info!("cluster network: the server's switch went away; reconnecting");
        }
    }))
}

/// Reads and drops the VM's frames for `d`.
async fn drain_for(own: &UnixDatagram, buf: &mut [u8], d: Duration) {
    let deadline = tokio::time::Instant::now() + d;
    while let Ok(Ok(_)) = tokio::time::timeout_at(deadline, own.recv(buf)).await {}
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn recv(s: &UnixDatagram) -> Vec<u8> {
        let mut b = vec![0u8; MAX_FRAME];
        let n = tokio::time::timeout(Duration::from_secs(5), s.recv(&mut b))
            .await
            .expect("a frame within 5 s")
            .unwrap();
        b.truncate(n);
        b
    }

    /// Until both relays are connected, frames may be lost: sends until one arrives.
    async fn until_through(from: &UnixDatagram, to: &UnixDatagram, frame: &[u8]) {
        for _ in 0..100 {
            from.send(frame).await.unwrap();
            let mut b = vec![0u8; MAX_FRAME];
            if let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(100), to.recv(&mut b)).await
            {
                assert_eq!(&b[..n], frame);
                return;
            }
        }
        panic!("no frame got through");
    }

    /// The VM's end as the test's own socket (the VMM's stand-in).
    fn tokio_end(fd: OwnedFd) -> UnixDatagram {
        let s = std::os::unix::net::UnixDatagram::from(fd);
        s.set_nonblocking(true).unwrap();
        UnixDatagram::from_std(s).unwrap()
    }

    /// Two VM ends (the server's and an agent's, through its relay) see each other's frames,
    /// the relay reconnects after the switch restarts, and a frame goes to every other port
    /// but never back to its sender.
    #[tokio::test]
    async fn frames_flow_between_the_server_and_agents_and_survive_a_restart() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("cluster.sock");
        let (server_vm, server_ours) = vm_pair().unwrap();
        let server_vm = tokio_end(server_vm);
        let switch = start_switch(server_ours, &sock).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let mut agents = Vec::new();
        for _ in 0..2 {
            let (vm, ours) = vm_pair().unwrap();
            agents.push((tokio_end(vm), start_relay(ours, sock.clone())));
        }
        until_through(&agents[0].0, &server_vm, b"a0->all").await;
        until_through(&agents[1].0, &server_vm, b"a1->all").await;
        // Drain what the agents got meanwhile from each other.
        for (vm, _) in &agents {
            let mut b = vec![0u8; MAX_FRAME];
            while let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_millis(200), vm.recv(&mut b)).await
            {
            }
        }
        // One frame from the server reaches both agents; none comes back to it.
        server_vm.send(b"server->all").await.unwrap();
        for (vm, _) in &agents {
            assert_eq!(recv(vm).await, b"server->all");
        }
        let mut b = vec![0u8; 64];
        assert!(
            tokio::time::timeout(Duration::from_millis(300), server_vm.recv(&mut b))
                .await
                .is_err(),
            "a frame came back to its sender"
        );
        // A 60000-byte frame goes whole.
        let big = vec![7u8; 60000];
        agents[0].0.send(&big).await.unwrap();
        assert_eq!(recv(&server_vm).await, big);

        // The server's supervisor goes away and comes back: the relays reconnect.
        drop(switch);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (vm2, ours2) = vm_pair().unwrap();
        let vm2 = tokio_end(vm2);
        let _switch = start_switch(ours2, &sock).unwrap();
        until_through(&agents[1].0, &vm2, b"after restart").await;
    }

    #[tokio::test]
    async fn a_bad_length_ends_the_connection() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("cluster.sock");
        let (_vm, ours) = vm_pair().unwrap();
        let _switch = start_switch(ours, &sock).unwrap();
        let mut s = UnixStream::connect(&sock).await.unwrap();
        // A zero length: the switch closes the connection.
        s.write_all(&[0, 0]).await.unwrap();
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0);
    }
}
