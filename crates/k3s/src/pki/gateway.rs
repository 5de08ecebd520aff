//! Gateway metadata for clients: where the gateway listens and the credentials to reach it.
//!
//! ```text
//! CONFIG/gateways/NAME/   0700   (CONFIG is config_dir(): $XDG_CONFIG_HOME/gatevm or ~/.config/gatevm)
//!   endpoint              0644   e.g. "https://127.0.0.1:PORT\n" (only when a gateway port is set)
//!   ca.crt                0644
//!   client.crt            0644
//!   client.key            0600
//!   gateway.json          0644   {"name", "endpoint", "ca", "cert", "key"} (absolute paths), written last
//! ```

use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::names::InputError;

use super::{
    fsutil, invalid_input, names, Pki, PkiError, CA_CERT_FILE, CLIENT_CERT_FILE, CLIENT_KEY_FILE,
};

/// The directory under the gatevm config directory holding one directory per gateway.
pub const GATEWAYS_DIR: &str = "gateways";
/// The file holding the endpoint URL.
pub const ENDPOINT_FILE: &str = "endpoint";
/// The JSON description of a gateway ([`GatewayMetadata`]).
pub const METADATA_FILE: &str = "gateway.json";

/// The contents of `gateway.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayMetadata {
    /// The gateway's name (the instance name, normally).
    pub name: String,
    /// Where the gateway listens, e.g. `https://127.0.0.1:8443`; null while the instance has no
    /// gateway port.
    pub endpoint: Option<String>,
    /// The CA certificate to verify the gateway with.
    pub ca: PathBuf,
    /// The client certificate.
    pub cert: PathBuf,
    /// The client key.
    pub key: PathBuf,
}

/// The gatevm config directory: `$XDG_CONFIG_HOME/gatevm` when that is set to an absolute path,
/// else `$HOME/.config/gatevm`; `None` when neither is usable. The directory is not created.
pub fn config_dir() -> Option<PathBuf> {
    // XDG_CONFIG_HOME counts only when it belongs to the calling user (root ignores another
    // user's, which `sudo` passes on).
    config_dir_from(
        gatevm_runtime::dirs::env_dir("XDG_CONFIG_HOME")
            .ok()
            .flatten()
            .map(PathBuf::into_os_string),
        std::env::var_os("HOME"),
    )
}

fn config_dir_from(xdg_config_home: Option<OsString>, home: Option<OsString>) -> Option<PathBuf> {
    // The XDG spec says relative paths are to be ignored.
    if let Some(xdg) = xdg_config_home
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
    {
        return Some(xdg.join("gatevm"));
    }
    home.map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .map(|home| home.join(".config").join("gatevm"))
}

fn check_name(name: &str) -> Result<(), PkiError> {
    names::dns1123_label(name).map_err(|reason| invalid_input("gateway name", name, reason))
}

fn check_endpoint(endpoint: &str) -> Result<(), PkiError> {
    let reason = match endpoint.strip_prefix("https://") {
        None => Some(InputError::NotHttps),
        Some("") => Some(InputError::NoHost),
        Some(_) if endpoint.len() > 2048 => Some(InputError::LongEndpoint),
        Some(_)
            if endpoint
                .chars()
                .any(|c| c.is_whitespace() || c.is_control()) =>
        {
            Some(InputError::EndpointChars)
        }
        Some(_) => None,
    };
    match reason {
        Some(reason) => Err(invalid_input("gateway endpoint", endpoint, reason)),
        None => Ok(()),
    }
}

/// Writes the metadata of gateway `name` into `CONFIG/gateways/NAME/` (see the module
/// documentation for the files and modes), replacing what is there; `config_dir` is the gatevm
/// config directory, normally [`config_dir()`]. Returns the gateway's directory. `gateway.json`
/// is written last, so a client that finds it finds the rest.
pub fn write_gateway_metadata(
    config_dir: &Path,
    name: &str,
    endpoint: Option<&str>,
    pki: &Pki,
) -> Result<PathBuf, PkiError> {
    check_name(name)?;
    if let Some(e) = endpoint {
        check_endpoint(e)?;
    }
    let config_dir = std::path::absolute(config_dir).map_err(|source| PkiError::Io {
        action: "resolve",
        path: config_dir.to_path_buf(),
        source,
    })?;
    let dir = config_dir.join(GATEWAYS_DIR).join(name);
    fsutil::ensure_private_dir(&dir)?;
    let metadata = GatewayMetadata {
        name: name.to_string(),
        endpoint: endpoint.map(str::to_string),
        ca: dir.join(CA_CERT_FILE),
        cert: dir.join(CLIENT_CERT_FILE),
        key: dir.join(CLIENT_KEY_FILE),
    };
    let mut json = serde_json::to_string_pretty(&metadata).map_err(|e| PkiError::Serialize {
        what: "gateway metadata",
        reason: crate::error_chain(&e),
    })?;
    json.push('\n');
    fsutil::write_atomic(&metadata.ca, pki.ca_cert.as_bytes(), fsutil::PUBLIC_MODE)?;
    fsutil::write_atomic(
        &metadata.cert,
        pki.client_cert.as_bytes(),
        fsutil::PUBLIC_MODE,
    )?;
    fsutil::write_atomic(&metadata.key, pki.client_key.as_bytes(), fsutil::KEY_MODE)?;
    match endpoint {
        Some(endpoint) => fsutil::write_atomic(
            &dir.join(ENDPOINT_FILE),
            format!("{endpoint}\n").as_bytes(),
            fsutil::PUBLIC_MODE,
        )?,
        None => match fs::remove_file(dir.join(ENDPOINT_FILE)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(PkiError::Io {
                    action: "remove",
                    path: dir.join(ENDPOINT_FILE),
                    source: e,
                })
            }
            _ => {}
        },
    }
    fsutil::write_atomic(
        &dir.join(METADATA_FILE),
        json.as_bytes(),
        fsutil::PUBLIC_MODE,
    )?;
    Ok(dir)
}

/// Removes the metadata directory of gateway `name` under `config_dir` (the gatevm config
/// directory); nothing to remove is not an error.
pub fn remove_gateway_metadata(config_dir: &Path, name: &str) -> Result<(), PkiError> {
    check_name(name)?;
    let dir = config_dir.join(GATEWAYS_DIR).join(name);
    let result = match fs::symlink_metadata(&dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => Err(e),
        // A symlink or stray file in its place: remove that, never what a link points to.
        Ok(meta) if !meta.is_dir() => fs::remove_file(&dir),
        Ok(_) => fs::remove_dir_all(&dir),
    };
    match result {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(PkiError::Io {
            action: "remove",
            path: dir,
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_dir_prefers_absolute_xdg_config_home() {
        let some = |s: &str| Some(OsString::from(s));
        assert_eq!(
            config_dir_from(some("/x/cfg"), some("/home/u")),
            Some(PathBuf::from("/x/cfg/gatevm"))
        );
        assert_eq!(
            config_dir_from(some("relative"), some("/home/u")),
            Some(PathBuf::from("/home/u/.config/gatevm"))
        );
        assert_eq!(
            config_dir_from(some(""), some("/home/u")),
            Some(PathBuf::from("/home/u/.config/gatevm"))
        );
        assert_eq!(
            config_dir_from(None, some("/home/u")),
            Some(PathBuf::from("/home/u/.config/gatevm"))
        );
        assert_eq!(config_dir_from(None, some("")), None);
        assert_eq!(config_dir_from(None, None), None);
        // Whatever the environment, the real lookup ends in "gatevm" when it finds anything.
        if let Some(dir) = config_dir() {
            assert!(dir.ends_with("gatevm"), "{}", dir.display());
        }
    }

    #[test]
    fn endpoints() {
        assert!(check_endpoint("https://127.0.0.1:8443").is_ok());
        assert!(check_endpoint("https://[::1]:8443").is_ok());
        for bad in [
            "",
            "http://127.0.0.1:1",
            "https://",
            "https://a b",
            "https://a\n",
            "127.0.0.1:1",
        ] {
            assert!(check_endpoint(bad).is_err(), "{bad:?} accepted");
        }
    }
}
