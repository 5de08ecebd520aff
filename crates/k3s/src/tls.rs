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

/// The client side of the check, built from an instance's PKI.
pub fn client_config(pki: &Pki) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    let ca = CertificateDer::from(
        cert::pem_decode(&pki.ca_cert, "CERTIFICATE")
            .map_err(|e| format!("the instance's CA certificate: {e}"))?,
    );
    roots
        .add(ca)
        .map_err(|e| format!("the instance's CA certificate: {e}"))?;
    let cert = CertificateDer::from(
        cert::pem_decode(&pki.client_cert, "CERTIFICATE")
            .map_err(|e| format!("the client certificate: {e}"))?,
    );
    let key = cert::pem_private_key(pki.client_key.as_bytes())
        .map_err(|e| format!("the client key: {e}"))?;
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![cert], key)
        .map_err(|e| format!("the client credentials: {e}"))
}

/// Connects to `addr` and completes a TLS handshake that verifies the server against the
/// instance's CA (for the address's IP, which the server certificate names for 127.0.0.1).
/// `Err` says in one line why not: nothing listening, no TLS, another CA, a timeout.
pub fn probe(addr: SocketAddr, pki: &Pki, timeout: Duration) -> Result<(), String> {
    let config = client_config(pki)?;
    let mut sock = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    sock.set_read_timeout(Some(timeout)).ok();
    sock.set_write_timeout(Some(timeout)).ok();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), ServerName::from(addr.ip()))
        .map_err(|e| e.to_string())?;
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut sock) {
            return Err(describe(addr, &e));
        }
    }
    Ok(())
}

/// One line for a failed handshake.
fn describe(addr: SocketAddr, e: &std::io::Error) -> String {
    let inner = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    match inner {
        Some(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)) => {
            format!("{addr} answers TLS with a certificate not signed by the instance's CA")
        }
        Some(rustls::Error::InvalidCertificate(c)) => {
            format!("{addr} answers TLS with an unacceptable certificate: {c:?}")
        }
        Some(r) => format!("TLS with {addr}: {r}"),
        None if matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) =>
        {
            format!("{addr} did not complete a TLS handshake in time")
        }
        None if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            format!("{addr} closed the connection during the TLS handshake")
        }
        None => format!("TLS with {addr}: {e}"),
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
        let e = probe(addr, &p, T).unwrap_err();
        assert!(e.contains("not signed by the instance's CA"), "{e}");
    }

    #[test]
    fn nothing_listening_or_no_tls_or_silence() {
        let (_d, p) = pki("gw");
        // A port nobody listens on, held for the test: the local end of a connection. (A listener
        // closed before the probe left its port to a parallel test's TLS server once.)
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let held = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let addr = held.local_addr().unwrap();
        let e = probe(addr, &p, T).unwrap_err();
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
        let e = probe(addr, &p, T).unwrap_err();
        assert!(e.starts_with("TLS with") || e.contains("closed"), "{e}");

        // A server that accepts and says nothing.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let held = std::thread::spawn(move || {
            let s = l.accept();
            std::thread::sleep(Duration::from_secs(2));
            drop(s);
        });
        let e = probe(addr, &p, Duration::from_millis(300)).unwrap_err();
        assert!(e.contains("in time"), "{e}");
        held.join().unwrap();
    }
}
