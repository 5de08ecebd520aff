//! The k3s plan the host writes ([`PLAN_PATH`]): its type and validating parser are the
//! contract's ([`gatevm_abi::plan`]); reading the file is the guest's.

pub(crate) use gatevm_abi::paths::{K3S_KUBECONFIG as KUBECONFIG, K3S_PLAN as PLAN_PATH};
pub(crate) use gatevm_abi::plan::{
    parse as parse_plan, valid_name, CniConflist, Plan, PlanError, DEFAULT_API_PORT, PLAN_MAX,
};
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::Path;

/// Reads and parses a plan file.
pub(crate) fn load_plan(path: &Path) -> Result<Plan, PlanError> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(PlanError::Missing(path.to_path_buf()))
        }
        Err(e) => return Err(PlanError::Read(path.to_path_buf(), e.to_string())),
    };
    let mut text = String::new();
    f.take(PLAN_MAX + 1)
        .read_to_string(&mut text)
        .map_err(|e| PlanError::Read(path.to_path_buf(), e.to_string()))?;
    if text.len() as u64 > PLAN_MAX {
        let size = fs::metadata(path).map(|m| m.len()).unwrap_or(PLAN_MAX + 1);
        return Err(PlanError::TooLarge(path.to_path_buf(), size));
    }
    parse_plan(&text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::k3s::containerd::containerd_config;
    use crate::profile::k3s::testutil::FULL;
    use gatevm_abi::plan::{check_data_dir, flag_value};
    use serde_json::json;
    use std::path::{Component, PathBuf};

    #[test]
    fn plan_file_missing_large_and_good() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("plan.json");
        let e = load_plan(&path).unwrap_err();
        assert_eq!(e, PlanError::Missing(path.clone()));
        assert!(e.to_string().contains("did not write the k3s plan"));
        fs::write(&path, vec![b' '; PLAN_MAX as usize + 1]).unwrap();
        assert!(matches!(load_plan(&path), Err(PlanError::TooLarge(_, _))));
        fs::write(&path, FULL).unwrap();
        assert_eq!(load_plan(&path).unwrap(), parse_plan(FULL).unwrap());
        let e = load_plan(d.path()).unwrap_err();
        assert!(matches!(e, PlanError::Read(_, _)), "{e:?}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        #[test]
        fn accepted_plans_are_usable(
            args in proptest::collection::vec("[-a-z=/.0-9 ]{0,20}", 0..6),
            dir in "/[a-z./]{1,20}",
            file in "[a-z0-9.-]{0,12}",
        ) {
            let v = json!({"args": args, "data_dir": dir, "cni": {"file": file, "json": "{}"}});
            if let Ok(p) = parse_plan(&v.to_string()) {
                // The data directory is absolute, not "/", and k3s is told to use it.
                proptest::prop_assert!(p.data_dir.is_absolute() && p.data_dir != Path::new("/"));
                proptest::prop_assert!(!p.data_dir.components().any(|c| c == Component::ParentDir));
                let named = flag_value(&p.args, "--data-dir", Some("-d")).map(PathBuf::from);
                let named = named.and_then(|d| check_data_dir(&d.to_string_lossy()).ok());
                proptest::prop_assert_eq!(named, Some(p.data_dir.clone()));
                // The CNI file stays a plain name inside the directory.
                let conf_dir = p.cni_conf_dir();
                // containerd is pointed at that same directory (the dir is [a-z./]: no quoting
                // changes it).
                let config = containerd_config(&p);
                let conf_line = format!("conf_dir = \"{}\"", conf_dir.display());
                proptest::prop_assert!(config.contains(&conf_line), "{}", config);
                let c = p.cni.clone().unwrap();
                proptest::prop_assert!(valid_name(&c.file));
                let placed = conf_dir.join(&c.file);
                proptest::prop_assert_eq!(placed.parent(), Some(conf_dir.as_path()));
            }
        }
    }
}
