//! The gateway's health check: does a port accept a TLS connection whose server certificate is
//! signed by the instance's CA, with the instance's client certificate offered (the gateway is
//! meant to require it)?
//!
//! The check is a full handshake from the host, through the port forward, with the same
//! credentials a client gets from the gateway metadata, so "healthy" means a client would get
//! through.

use crate::cert;
use crate::pki::Pki;
use rustls::pki_types::{CertificateDer, ServerName};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

/// Why the gateway's health check failed: one line, naming the address or the credential.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A credential of the instance's PKI cannot be used.
    #[error("cannot use {what}")]
    Credential {
        /// Which one ("the client key", ...).
        what: &'static str,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// rustls refused the client configuration.
    #[error("cannot configure the TLS client")]
    Config(#[source] rustls::Error),
    /// Nothing accepted the connection.
    #[error("connecting to {addr}")]
    Connect {
        /// The address.
        addr: SocketAddr,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The server's certificate is not signed by the instance's CA.
    #[error("{addr} answers TLS with a certificate not signed by the instance's CA")]
    UnknownIssuer {
        /// The address.
        addr: SocketAddr,
    },
    /// The server's certificate is unacceptable for another reason.
    #[error("{addr} answers TLS with an unacceptable certificate: {reason}")]
    BadCertificate {
        /// The address.
        addr: SocketAddr,
        /// rustls's description of the problem.
        reason: String,
    },
    /// The handshake failed.
    #[error("TLS with {addr}")]
    Tls {
        /// The address.
        addr: SocketAddr,
        /// The error.
        #[source]
        source: rustls::Error,
    },
    /// The handshake did not finish within the timeout.
    #[error("{addr} did not complete a TLS handshake in time")]
    Timeout {
        /// The address.
        addr: SocketAddr,
    },
    /// The server closed the connection during the handshake.
    #[error("{addr} closed the connection during the TLS handshake")]
    Closed {
        /// The address.
        addr: SocketAddr,
    },
    /// The server turned the client certificate away (an alert after the client's side of a
    /// TLS 1.3 handshake ended).
    #[error("{addr} refused the instance's client certificate")]
    ClientRefused {
        /// The address.
        addr: SocketAddr,
        /// The alert, as rustls reports it.
        #[source]
        source: rustls::Error,
    },
    /// The server closed the connection right after the handshake, before any answer.
    #[error("{addr} closed the connection right after the TLS handshake")]
    ClosedAfterHandshake {
        /// The address.
        addr: SocketAddr,
    },
    /// The connection failed during the handshake.
    #[error("TLS with {addr}")]
    Io {
        /// The address.
        addr: SocketAddr,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

fn credential<E>(what: &'static str) -> impl FnOnce(E) -> TlsError
where
    E: std::error::Error + Send + Sync + 'static,
{
    move |e| TlsError::Credential {
        what,
        source: Box::new(e),
    }
}

/// The client side of the check, built from an instance's PKI.
pub fn client_config(pki: &Pki) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    let ca = CertificateDer::from(
        cert::pem_decode(&pki.ca_cert, "CERTIFICATE")
            .map_err(credential("the instance's CA certificate"))?,
    );
    roots
        .add(ca)
        .map_err(credential("the instance's CA certificate"))?;
    let cert = CertificateDer::from(
        cert::pem_decode(&pki.client_cert, "CERTIFICATE")
            .map_err(credential("the client certificate"))?,
    );
    let key =
        cert::pem_private_key(pki.client_key.as_bytes()).map_err(credential("the client key"))?;
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![cert], key)
        .map_err(credential("the client credentials"))
}

/// Connects to `addr` and completes a TLS handshake that verifies the server against the
/// instance's CA (for the address's IP, which the server certificate names for 127.0.0.1).
/// `Err` says in one line why not: nothing listening, no TLS, another CA, a timeout.
pub fn probe(addr: SocketAddr, pki: &Pki, timeout: Duration) -> Result<(), TlsError> {
    let config = client_config(pki)?;
    let mut sock = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|source| TlsError::Connect { addr, source })?;
    sock.set_read_timeout(Some(timeout)).ok();
    sock.set_write_timeout(Some(timeout)).ok();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), ServerName::from(addr.ip()))
        .map_err(TlsError::Config)?;
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut sock) {
            return Err(describe(addr, e));
        }
    }
    // In TLS 1.2 the server's Finished, which the client has now checked, follows its verdict
    // on the client certificate; in TLS 1.3 the client's side ends first, and the verdict
    // comes after.
    if conn.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3) {
        await_verdict(addr, &mut conn, &mut sock, timeout.min(VERDICT_WITHIN))?;
    }
    Ok(())
}

/// How long, after a TLS 1.3 handshake, the check waits for the server to turn the client
/// certificate away (a server that accepts it may say nothing until the client speaks).
const VERDICT_WITHIN: Duration = Duration::from_secs(1);

/// Waits up to `within` for what the server sends after the client's side of a TLS 1.3
/// handshake: an alert (or the connection closed) means it refused the client certificate;
/// anything else it sends (session tickets, data), or silence, means it took it.
fn await_verdict(
    addr: SocketAddr,
    conn: &mut rustls::ClientConnection,
    sock: &mut TcpStream,
    within: Duration,
) -> Result<(), TlsError> {
    sock.set_read_timeout(Some(within)).ok();
    match conn.read_tls(sock) {
        Ok(0) => Err(TlsError::ClosedAfterHandshake { addr }),
        Ok(_) => match conn.process_new_packets() {
            Ok(_) => Ok(()),
            Err(source) => Err(TlsError::ClientRefused { addr, source }),
        },
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Ok(())
        }
        Err(source) => Err(TlsError::Io { addr, source }),
    }
}

/// The error of a failed handshake.
fn describe(addr: SocketAddr, e: std::io::Error) -> TlsError {
    let inner = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    match inner {
        Some(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)) => {
            TlsError::UnknownIssuer { addr }
        }
        Some(rustls::Error::InvalidCertificate(c)) => TlsError::BadCertificate {
            addr,
            reason: format!("{c:?}"),
        },
        Some(r) => TlsError::Tls {
            addr,
            source: r.clone(),
        },
        None if matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) =>
        {
            TlsError::Timeout { addr }
        }
        None if e.kind() == std::io::ErrorKind::UnexpectedEof => TlsError::Closed { addr },
        None => TlsError::Io { addr, source: e },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{load_or_create, PkiOptions};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::PrivateKeyDer;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    fn pki(name: &str) -> (tempfile::TempDir, Pki) {
        let d = tempfile::tempdir().unwrap();
        let p = load_or_create(d.path(), &PkiOptions::new(name)).unwrap();
        (d, p)
    }

    /// A TLS server with `server`'s pair that requires a client certificate signed by
    /// `client_ca`'s CA; answers "hi" to each connection.
    fn tls_server(server: &Pki, client_ca: &Pki) -> SocketAddr {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(client_ca.ca_cert.as_bytes()).unwrap())
            .unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.into(),
            provider.clone(),
        )
        .build()
        .unwrap();
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![CertificateDer::from_pem_slice(server.server_cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(server.server_key.as_bytes()).unwrap(),
            )
            .unwrap();
        let cfg = Arc::new(cfg);
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let cfg = cfg.clone();
                std::thread::spawn(move || {
                    let mut s = s;
                    let mut c = rustls::ServerConnection::new(cfg).unwrap();
                    let mut t = rustls::Stream::new(&mut c, &mut s);
                    let _ = t.write_all(b"hi");
                    let _ = t.flush();
                });
            }
        });
        addr
    }

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn accepts_a_server_of_the_instances_ca() {
        let (_d, p) = pki("gw");
        let addr = tls_server(&p, &p);
        probe(addr, &p, T).unwrap();
    }

    #[test]
    fn refuses_a_server_of_another_ca() {
        let (_d, p) = pki("gw");
        let (_e, other) = pki("other");
        let addr = tls_server(&other, &other);
        let e = probe(addr, &p, T).unwrap_err().to_string();
        assert!(e.contains("not signed by the instance's CA"), "{e}");
    }

    /// A gateway that requires a client certificate of another CA turns the instance's away:
    /// a client would not get through, so the check fails. (In TLS 1.3 the client's side of
    /// the handshake ends before the server has judged its certificate.)
    #[test]
    fn refuses_a_server_that_turns_the_client_certificate_away() {
        let (_d, p) = pki("gw");
        let (_e, other) = pki("other");
        let addr = tls_server(&p, &other);
        let e = probe(addr, &p, T).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{addr} refused the instance's client certificate")
        );
        let alert = std::error::Error::source(&e).map(ToString::to_string);
        assert_eq!(
            alert.as_deref(),
            Some("received fatal alert: UnknownCA"),
            "{e:?}"
        );
    }

    #[test]
    fn nothing_listening_or_no_tls_or_silence() {
        let (_d, p) = pki("gw");
        // A port nobody listens on, held for the test: the local end of a connection. (A listener
        // closed before the probe left its port to a parallel test's TLS server once.)
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let held = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let addr = held.local_addr().unwrap();
        let e = probe(addr, &p, T).unwrap_err().to_string();
        assert!(e.contains("connecting to"), "{e}");
        drop((held, l));

        // A plain TCP server that answers garbage.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf);
                let _ = s.write_all(b"HTTP/1.0 400 Bad Request\r\n\r\n");
            }
        });
        let e = probe(addr, &p, T).unwrap_err().to_string();
        assert!(e.starts_with("TLS with") || e.contains("closed"), "{e}");

        // A server that accepts and says nothing.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let held = std::thread::spawn(move || {
            let s = l.accept();
            std::thread::sleep(Duration::from_secs(2));
            drop(s);
        });
        let e = probe(addr, &p, Duration::from_millis(300))
            .unwrap_err()
            .to_string();
        assert!(e.contains("in time"), "{e}");
        held.join().unwrap();
    }
}
