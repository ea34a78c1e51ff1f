//! A real PostgreSQL server for one test: a fresh cluster in a temporary directory on a
//! free port, stopped and removed on drop. It needs PostgreSQL's server programs
//! (Debian: `apt-get install postgresql`, which `.ci/run` does); `VEIL_PG_BIN` names
//! their directory when they are neither on PATH nor under /usr/lib/postgresql.

use std::path::PathBuf;
use std::process::Command;

pub struct Postgres {
    pub url: String,
    dir: PathBuf,
    bin: PathBuf,
    as_root: bool,
}

/// The directory holding `initdb` and `pg_ctl`.
fn find_bin() -> PathBuf {
    if let Ok(dir) = std::env::var("VEIL_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("initdb").exists())
        .collect();
    // the newest version (directories are named by major version)
    found.sort_by_key(|p| {
        p.parent().and_then(|v| v.file_name()).and_then(|v| v.to_str()).and_then(|v| v.parse::<u32>().ok())
    });
    if let Some(b) = found.pop() {
        return b;
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).find(|d| d.join("initdb").exists()))
        .unwrap_or_default();
    on_path.unwrap_or_else(|| {
        panic!(
            "this test needs a PostgreSQL server's programs (initdb, pg_ctl): install them \
             (Debian: apt-get install postgresql; .ci/run does) or set VEIL_PG_BIN to their directory"
        )
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Postgres {
    pub fn start(name: &str) -> Postgres {
        let bin = find_bin();
        // PostgreSQL refuses to run as root: then its programs run as the postgres user
        let as_root = String::from_utf8_lossy(&Command::new("id").arg("-u").output().unwrap().stdout).trim() == "0";
        let dir = std::env::temp_dir().join(format!("veil-pg-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        if as_root {
            let st = Command::new("chown").args(["-R", "postgres:postgres"]).arg(&dir).status().unwrap();
            assert!(st.success(), "chown {} to postgres (is there a postgres user?)", dir.display());
        }
        let port = free_port();
        let pg = Postgres { url: format!("postgres://veil@127.0.0.1:{port}/postgres"), dir, bin, as_root };
        let data = pg.dir.join("data");
        pg.run("initdb", &["-D", data.to_str().unwrap(), "-U", "veil", "--auth=trust", "--no-sync", "-E", "UTF8"]);
        let opts = format!("-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off", pg.dir.display());
        let log = pg.dir.join("log");
        pg.run("pg_ctl", &["-D", data.to_str().unwrap(), "-o", &opts, "-l", log.to_str().unwrap(), "-w", "start"]);
        pg
    }

    fn run(&self, program: &str, args: &[&str]) {
        let path = self.bin.join(program);
        let out = if self.as_root {
            Command::new("runuser").args(["-u", "postgres", "--"]).arg(&path).args(args).current_dir(&self.dir).output()
        } else {
            Command::new(&path).args(args).current_dir(&self.dir).output()
        }
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()));
        assert!(
            out.status.success(),
            "{program} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// One SQL query through psql: its rows, fields separated by '|'.
    pub fn query(&self, sql: &str) -> Vec<String> {
        let psql = if self.bin.join("psql").exists() { self.bin.join("psql") } else { PathBuf::from("psql") };
        let out = Command::new(psql).args([&self.url, "-XAtc", sql]).output().expect("psql runs");
        assert!(out.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let path = self.bin.join("pg_ctl");
        let args = ["-D", data.to_str().unwrap(), "-m", "immediate", "stop"];
        let _ = if self.as_root {
            Command::new("runuser").args(["-u", "postgres", "--"]).arg(&path).args(args).output()
        } else {
            Command::new(&path).args(args).output()
        };
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
