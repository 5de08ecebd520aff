//! k3s's datastore (kine on SQLite) at boot, before k3s starts, after a VM that may have been
//! killed:
//!
//! - [`check_header`]: a `state.db` whose header is not SQLite's is moved aside whole (with its
//!   WAL, index and journal) into `server/db/corrupt-<time>/` ([`move_aside`]), never deleted;
//!   k3s then starts with an empty datastore and `gatevm status` says where the old one went.
//! - [`clear_bootstrap_locks`]: k3s's bootstrap lock left by a k3s killed between taking it
//!   and writing its bootstrap data is removed with the rootfs's `sqlite3`.
//! - [`kine_stale_files`]: which SQLite companions are stale and safe to remove.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// k3s's datastore with its default SQLite backend (kine) is `<data-dir>/server/db/state.db`,
/// opened in WAL mode, so next to it may be `state.db-wal` (committed transactions not yet
/// copied into the database) and `state.db-shm` (the WAL's index, shared memory between
/// connections). This returns the files that are stale at boot and safe to delete. It runs
/// before k3s starts in this boot, when nothing has the database open.
///
/// - `state.db` exists (a regular file): only `state.db-shm`. It holds no data, only an index
///   of the WAL, which the first connection rebuilds from `state.db-wal` (SQLite would also
///   discard a stale one by itself; removing it makes certain no index of a crashed run is
///   reused). `state.db-wal` is kept: deleting it loses the transactions committed since the
///   last checkpoint. A `state.db-journal` is kept too: a hot rollback journal is what undoes a
///   half-written transaction. `state.db` itself is never deleted.
/// - `state.db` does not exist (first boot, or a reset that removed only the database):
///   `state.db-wal`, `state.db-shm` and `state.db-journal`, left without their database. SQLite
///   ignores and deletes a WAL or journal whose database is missing or empty, so they hold
///   nothing; they are removed so that no leftover of an earlier datastore sits next to the new
///   one.
/// - `state.db` is something else (a directory, a symbolic link): nothing; gatevm does not
///   guess.
///
/// Never removed: `*.lock` files. SQLite's default unix VFS locks with POSIX advisory locks,
/// which die with the process (and the VM), and kine creates no lock files, so a lock file here
/// is not SQLite's or kine's. k3s's "bootstrap lock" is not a file either: it is a row of the
/// `kine` table, see [`clear_bootstrap_locks`].
///
/// Only regular files are returned (never symbolic links or directories).
pub(crate) fn kine_stale_files(db_dir: &Path) -> Vec<PathBuf> {
    let db = db_dir.join("state.db");
    let candidates: &[&str] = match fs::symlink_metadata(&db) {
        Ok(m) if m.file_type().is_file() => &["state.db-shm"],
        Ok(_) => &[],
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            &["state.db-wal", "state.db-shm", "state.db-journal"]
        }
        Err(_) => &[],
    };
    candidates
        .iter()
        .map(|n| db_dir.join(n))
        .filter(|p| fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_file()))
        .collect()
}

/// Removes [`kine_stale_files`]; returns what was removed and the problems.
pub(crate) fn clean_kine(db_dir: &Path) -> (Vec<String>, Vec<String>) {
    let mut removed = Vec::new();
    let mut problems = Vec::new();
    for p in kine_stale_files(db_dir) {
        match fs::remove_file(&p) {
            Ok(()) => removed.push(p.display().to_string()),
            Err(e) => problems.push(format!("cannot remove {}: {e}", p.display())),
        }
    }
    (removed, problems)
}

/// SQLite's file header magic.
const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// Checks a database file's 100-byte header as SQLite reads it: the magic string, a page size
/// that is a power of two from 512 to 65536, the payload fractions fixed at 64/32/32, and a file
/// length that is a whole number of pages. An empty file is a valid empty database. The error
/// says what is wrong.
pub(crate) fn check_header(db: &Path) -> Result<(), String> {
    use std::io::Read;
    let mut f = fs::File::open(db).map_err(|e| format!("cannot open it: {e}"))?;
    let len = f
        .metadata()
        .map_err(|e| format!("cannot stat it: {e}"))?
        .len();
    if len == 0 {
        return Ok(());
    }
    let mut h = [0u8; 100];
    if len < 100 || f.read_exact(&mut h).is_err() {
        return Err(format!(
            "{len} bytes, shorter than SQLite's 100-byte header"
        ));
    }
    if &h[..16] != SQLITE_MAGIC {
        return Err("no SQLite header (\"SQLite format 3\" missing)".into());
    }
    let page = match u16::from_be_bytes([h[16], h[17]]) {
        1 => 65536u64,
        p => u64::from(p),
    };
    if !(512..=65536).contains(&page) || !page.is_power_of_two() {
        return Err(format!(
            "page size {page} is not a power of two from 512 to 65536"
        ));
    }
    if h[21..24] != [64, 32, 32] {
        return Err("payload fractions are not SQLite's fixed 64/32/32".into());
    }
    if len % page != 0 {
        return Err(format!(
            "{len} bytes is not a whole number of {page}-byte pages"
        ));
    }
    Ok(())
}

/// Moves `state.db` and its companions into a new `corrupt-<unix seconds>` directory next to
/// them; returns that directory.
pub(crate) fn move_aside(db_dir: &Path, now_secs: u64) -> io::Result<PathBuf> {
    let mut dest = db_dir.join(format!("corrupt-{now_secs}"));
    let mut n = 1;
    while fs::symlink_metadata(&dest).is_ok() {
        dest = db_dir.join(format!("corrupt-{now_secs}-{n}"));
        n += 1;
    }
    crate::fsutil::mkdir_private(&dest)?;
    for name in [
        "state.db",
        "state.db-wal",
        "state.db-shm",
        "state.db-journal",
    ] {
        let p = db_dir.join(name);
        if fs::symlink_metadata(&p).is_ok() {
            fs::rename(&p, dest.join(name))?;
        }
    }
    gatevm_fsutil::sync_dir(db_dir)?;
    Ok(dest)
}

/// The SQL that removes stale bootstrap locks and prints the keys it removed.
///
/// k3s takes its bootstrap lock by creating the key `/bootstrap/<token hash>` with an empty
/// value, then replaces it with the encrypted bootstrap data. A k3s killed in between leaves the
/// empty key, and the next k3s waits for it. kine keeps every revision as a row of the `kine`
/// table (`name`, `value`, `deleted`, ...; the highest `id` of a name is its current revision),
/// so a stale lock is a `/bootstrap/` name whose latest row is not a deletion and has an empty
/// value; its rows are deleted. A key whose latest value holds data is never touched: deleting
/// every `/bootstrap/%` row, as some scripts do, would destroy the bootstrap data too.
pub(crate) const CLEAR_BOOTSTRAP_LOCKS_SQL: &str = "\
.bail on
BEGIN IMMEDIATE;
CREATE TEMP TABLE gatevm_stale AS
  SELECT k.name AS name FROM kine k
  WHERE k.name LIKE '/bootstrap/%'
    AND k.id = (SELECT MAX(id) FROM kine WHERE name = k.name)
    AND k.deleted = 0
    AND (k.value IS NULL OR length(k.value) = 0);
SELECT name FROM gatevm_stale;
DELETE FROM kine WHERE name IN (SELECT name FROM gatevm_stale);
COMMIT;
";

/// Where the rootfs's SQLite shell is looked for.
pub(crate) fn sqlite3() -> Option<PathBuf> {
    ["/usr/bin/sqlite3", "/bin/sqlite3"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// Removes stale bootstrap locks from `db` with the `sqlite3` shell at `shell`
/// ([`CLEAR_BOOTSTRAP_LOCKS_SQL`]); returns the keys removed. A database without kine's table
/// (a fresh one) has none.
pub(crate) fn clear_bootstrap_locks(shell: &Path, db: &Path) -> Result<Vec<String>, String> {
    let mut cmd = std::process::Command::new(shell);
    cmd.arg("-batch").arg("-cmd").arg(".timeout 5000").arg(db);
    let out = crate::cni::run_captured(&mut cmd, Some(CLEAR_BOOTSTRAP_LOCKS_SQL.as_bytes()))
        .map_err(|e| format!("cannot run {}: {e}", shell.display()))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.success() || !stderr.trim().is_empty() {
        if stderr.contains("no such table: kine") {
            return Ok(Vec::new());
        }
        let msg = stderr.lines().map(str::trim).find(|l| !l.is_empty());
        return Err(match msg {
            Some(m) => format!("sqlite3: {m}"),
            None => format!("sqlite3 failed ({})", crate::reaper::describe(&out.status)),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("/bootstrap/"))
        .map(str::to_string)
        .collect())
}

/// The datastore's boot-time recovery (see the module docs), before k3s starts: returns the
/// lines for the log and `gatevm status`, and the problems.
pub(crate) fn recover(db_dir: &Path, now_secs: u64) -> (Vec<String>, Vec<String>) {
    let mut notes = Vec::new();
    let mut problems = Vec::new();
    let db = db_dir.join("state.db");
    let is_file = fs::symlink_metadata(&db).is_ok_and(|m| m.file_type().is_file());
    if is_file {
        if let Err(why) = check_header(&db) {
            match move_aside(db_dir, now_secs) {
                Ok(dest) => notes.push(format!(
                    "state.db failed its header check ({why}): moved with its WAL to {}; k3s \
                     starts with an empty datastore (the old one is kept there)",
                    dest.display()
                )),
                Err(e) => problems.push(format!(
                    "state.db failed its header check ({why}) and could not be moved aside: {e}"
                )),
            }
        }
    }
    let (removed, p) = clean_kine(db_dir);
    for r in removed {
        notes.push(format!("removed stale {r}"));
    }
    problems.extend(p);
    if fs::symlink_metadata(&db).is_ok_and(|m| m.file_type().is_file() && m.len() > 0) {
        match sqlite3() {
            Some(shell) => match clear_bootstrap_locks(&shell, &db) {
                Ok(keys) => {
                    for k in keys {
                        notes.push(format!(
                            "removed a stale bootstrap lock ({k}, empty: k3s was stopped \
                             while taking it)"
                        ));
                    }
                }
                Err(e) => problems.push(format!("checking for a stale bootstrap lock: {e}")),
            },
            None => problems.push(
                "no sqlite3 in the root: a stale bootstrap lock is left to k3s (it waits for \
                 it, then removes it)"
                    .into(),
            ),
        }
    }
    (notes, problems)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::k3s::testutil::{names, write};
    use std::os::unix::fs::symlink;

    #[test]
    fn kine_cleanup_decision() {
        let d = tempfile::tempdir().unwrap();
        let db = d.path().join("server/db");
        fs::create_dir_all(&db).unwrap();
        for n in [
            "state.db-wal",
            "state.db-shm",
            "state.db-journal",
            "state.db.lock",
        ] {
            write(&db.join(n), "x");
        }
        // No database: its companions are orphans, and only they go.
        let stale = kine_stale_files(&db);
        assert_eq!(
            stale,
            vec![
                db.join("state.db-wal"),
                db.join("state.db-shm"),
                db.join("state.db-journal")
            ]
        );

        // With the database: only the shared-memory index; never the database or its WAL.
        write(&db.join("state.db"), "SQLite format 3\0");
        assert_eq!(kine_stale_files(&db), vec![db.join("state.db-shm")]);
        let (removed, problems) = clean_kine(&db);
        assert_eq!(removed, vec![db.join("state.db-shm").display().to_string()]);
        assert!(problems.is_empty());
        assert_eq!(
            names(&db),
            vec![
                "state.db",
                "state.db-journal",
                "state.db-wal",
                "state.db.lock"
            ]
        );
        assert!(kine_stale_files(&db).is_empty());

        // A symbolic link in place of a companion is not removed.
        symlink(d.path(), db.join("state.db-shm")).unwrap();
        assert!(kine_stale_files(&db).is_empty());

        // Something odd in place of the database: no guessing.
        let odd = d.path().join("odd");
        fs::create_dir_all(odd.join("state.db")).unwrap();
        write(&odd.join("state.db-wal"), "x");
        assert!(kine_stale_files(&odd).is_empty());
        // No directory at all (first boot).
        assert!(kine_stale_files(&d.path().join("none")).is_empty());
    }

    /// A header as SQLite writes it, for a file of `pages` pages of `page` bytes.
    fn sqlite_file(page: u16, pages: usize) -> Vec<u8> {
        let mut v = vec![0u8; usize::from(page).max(512) * pages];
        v[..16].copy_from_slice(SQLITE_MAGIC);
        v[16..18].copy_from_slice(&page.to_be_bytes());
        v[21] = 64;
        v[22] = 32;
        v[23] = 32;
        v
    }

    #[test]
    fn header_check() {
        let d = tempfile::tempdir().unwrap();
        let db = d.path().join("state.db");
        let check = |bytes: &[u8]| {
            fs::write(&db, bytes).unwrap();
            check_header(&db)
        };
        assert_eq!(check(&sqlite_file(4096, 2)), Ok(()));
        assert_eq!(check(&sqlite_file(512, 3)), Ok(()));
        assert_eq!(check(b""), Ok(()));
        assert!(check(b"SQLite format 3\0").unwrap_err().contains("shorter"));
        assert!(check(&[0u8; 4096])
            .unwrap_err()
            .contains("no SQLite header"));
        let mut v = sqlite_file(4096, 1);
        v[16..18].copy_from_slice(&1000u16.to_be_bytes());
        assert!(check(&v).unwrap_err().contains("page size"));
        let mut v = sqlite_file(4096, 1);
        v[21] = 0;
        assert!(check(&v).unwrap_err().contains("fractions"));
        let mut v = sqlite_file(4096, 2);
        v.truncate(5000);
        assert!(check(&v).unwrap_err().contains("whole number"));
        assert!(check_header(&d.path().join("none")).is_err());
    }

    #[test]
    fn a_corrupt_database_is_moved_aside_whole_and_never_deleted() {
        let d = tempfile::tempdir().unwrap();
        let db = d.path().join("server/db");
        write(&db.join("state.db"), "this is not sqlite, but a torn write ...................................................................");
        write(&db.join("state.db-wal"), "wal");
        write(&db.join("state.db-shm"), "shm");
        let (notes, problems) = recover(&db, 1_700_000_000);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(
            notes[0].contains("failed its header check") && notes[0].contains("corrupt-1700000000"),
            "{notes:?}"
        );
        let aside = db.join("corrupt-1700000000");
        assert_eq!(names(&aside), ["state.db", "state.db-shm", "state.db-wal"]);
        assert!(fs::read_to_string(aside.join("state.db"))
            .unwrap()
            .starts_with("this is not sqlite"));
        assert_eq!(names(&db), ["corrupt-1700000000"]);
        // A second one in the same second gets its own directory.
        write(&db.join("state.db"), "junk junk junk junk junk junk junk junk junk junk junk junk junk junk junk junk junk junk junk junk junk");
        let (notes, _) = recover(&db, 1_700_000_000);
        assert!(notes[0].contains("corrupt-1700000000-1"), "{notes:?}");
        // A good header is left alone.
        let good = d.path().join("good");
        fs::create_dir_all(&good).unwrap();
        fs::write(good.join("state.db"), sqlite_file(4096, 1)).unwrap();
        let (notes, _) = recover(&good, 1);
        assert!(!notes.iter().any(|n| n.contains("header")), "{notes:?}");
        assert!(good.join("state.db").is_file());
    }

    /// With a real SQLite shell (the rootfs's; on the host, Debian's `sqlite3` when installed):
    /// a kine table built here with a stale lock, a populated bootstrap key, a lock that was
    /// later filled in, and other keys. Only the stale lock goes.
    #[test]
    fn stale_bootstrap_locks_are_removed_and_nothing_else() {
        let Some(shell) = sqlite3() else {
            gatevm_testkit::skip(
                "stale_bootstrap_locks_are_removed_and_nothing_else",
                "no sqlite3 on this machine (scripts/test.sh installs it)",
            );
            return;
        };
        let d = tempfile::tempdir().unwrap();
        let db = d.path().join("state.db");
        let sql = |script: &str| {
            let mut c = std::process::Command::new(&shell);
            c.arg("-batch").arg(&db);
            let out = crate::cni::run_captured(&mut c, Some(script.as_bytes())).unwrap();
            assert!(out.success(), "{}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        // A fresh database (no kine table) has none.
        sql("CREATE TABLE other(x);");
        assert_eq!(clear_bootstrap_locks(&shell, &db), Ok(vec![]));
        // kine's table, as kine creates it.
        sql("CREATE TABLE kine (id INTEGER PRIMARY KEY AUTOINCREMENT, name INTEGER, created INTEGER, deleted INTEGER, create_revision INTEGER, prev_revision INTEGER, lease INTEGER, value BLOB, old_value BLOB);
             INSERT INTO kine(name, created, deleted, value) VALUES
               ('/bootstrap/stale', 1, 0, ''),
               ('/bootstrap/filled', 1, 0, ''),
               ('/bootstrap/filled', 0, 0, x'0102'),
               ('/bootstrap/data', 1, 0, x'0304'),
               ('/registry/x', 1, 0, ''),
               ('/bootstrap/gone', 1, 0, ''),
               ('/bootstrap/gone', 0, 1, '');");
        assert_eq!(
            clear_bootstrap_locks(&shell, &db),
            Ok(vec!["/bootstrap/stale".to_string()])
        );
        let left = sql("SELECT name || ':' || length(value) FROM kine ORDER BY id;");
        assert_eq!(
            left.lines().collect::<Vec<_>>(),
            [
                "/bootstrap/filled:0",
                "/bootstrap/filled:2",
                "/bootstrap/data:2",
                "/registry/x:0",
                "/bootstrap/gone:0",
                "/bootstrap/gone:0"
            ]
        );
        // Nothing more the second time.
        assert_eq!(clear_bootstrap_locks(&shell, &db), Ok(vec![]));
        // Through recover(): notes name the key.
        sql("INSERT INTO kine(name, created, deleted, value) VALUES ('/bootstrap/again', 1, 0, NULL);");
        let (notes, problems) = recover(d.path(), 5);
        assert!(problems.is_empty(), "{problems:?}");
        assert!(
            notes.iter().any(|n| n.contains("/bootstrap/again")),
            "{notes:?}"
        );
        // A file that passes the header check but is not a database: a problem, nothing lost.
        let bad = d.path().join("bad");
        fs::create_dir_all(&bad).unwrap();
        let mut v = sqlite_file(4096, 2);
        v[100..200].fill(0xff);
        v[28..32].copy_from_slice(&7u32.to_be_bytes());
        fs::write(bad.join("state.db"), &v).unwrap();
        let (_, problems) = recover(&bad, 5);
        assert!(bad.join("state.db").is_file());
        eprintln!("not a database behind a good header: {problems:?}");
    }
}
