//! Scale-out through a real PostgreSQL queue: `veil serve --queue` splits a job into
//! tasks, two `veil worker` processes share them, one is killed in the middle of a task,
//! and the server is killed and restarted with the job queued. Every task is completed
//! exactly once and the decrypted results equal clear execution. Misconfigured workers
//! (another compile of the model, a data directory that is not the server's) take none
//! of the work.

mod common;

use common::postgres::Postgres;
use common::*;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A child process killed when dropped; its stderr goes to `log`.
struct Proc {
    child: Child,
    log: std::path::PathBuf,
}

impl Proc {
    fn spawn(args: &[&str], log: &Path) -> Proc {
        let err = std::fs::File::create(log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_veil"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("veil starts");
        Proc { child, log: log.to_path_buf() }
    }

    fn signal(&self, sig: &str) {
        let st = Command::new("kill").args([sig, &self.child.id().to_string()]).status().unwrap();
        assert!(st.success(), "kill {sig}");
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn get(url: &str, token: &str) -> serde_json::Value {
    let r = ureq::get(url).set("Authorization", &format!("Bearer {token}")).call().unwrap();
    serde_json::from_reader(r.into_reader()).unwrap()
}

/// Submit the ciphertext file `ct` as a job for `key`: the job id.
fn submit(url: &str, key: &str, token: &str, ct: &Path) -> String {
    let r = ureq::post(&format!("{url}/keys/{key}/jobs"))
        .set("Authorization", &format!("Bearer {token}"))
        .send_bytes(&std::fs::read(ct).unwrap())
        .unwrap();
    let v: serde_json::Value = serde_json::from_reader(r.into_reader()).unwrap();
    v["job_id"].as_str().unwrap().to_string()
}

fn wait_healthy(url: &str, server: &Proc) {
    let start = Instant::now();
    while ureq::get(&format!("{url}/health")).call().is_err() {
        assert!(start.elapsed() < Duration::from_secs(60), "the server did not come up:\n{}", server.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn two_workers_share_a_postgres_queue_through_a_worker_kill_and_a_server_restart() {
    let pg = Postgres::start("queue");
    let dir = scratch("queue");
    let m = models().join("trees/rf_wine_3x3");
    let model = dir.join("forest.veil");
    ok(&["compile", s(&m.join("model.onnx")), "--calib", s(&m.join("calib.npy")), "-o", s(&model)]);
    let keys = dir.join("keys");
    ok(&["keygen", s(&model), "--out-dir", s(&keys)]);
    let (x, ct) = (m.join("test_x.npy"), dir.join("x.ct"));
    ok(&["encrypt", s(&model), "--client-key", s(&keys.join("client.key")), "-i", s(&x), "-o", s(&ct)]);
    let clear = dir.join("clear.npy");
    ok(&["predict", s(&model), "-i", s(&x), "-o", s(&clear), "--mode", "clear"]);
    // the same forest compiled otherwise (another fingerprint), under the same file name
    let other_dir = dir.join("other");
    std::fs::create_dir_all(&other_dir).unwrap();
    let other = other_dir.join("forest.veil");
    ok(&[
        "compile",
        s(&m.join("model.onnx")),
        "--calib",
        s(&m.join("calib.npy")),
        "--tree-tests",
        "server",
        "-o",
        s(&other),
    ]);

    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (addr, url) = (format!("127.0.0.1:{port}"), format!("http://127.0.0.1:{port}"));
    let data = dir.join("data");
    let serve_args =
        ["serve", s(&model), "--listen", &addr, "--data-dir", s(&data), "--queue", &pg.url, "--samples-per-task", "3"];
    let mut server = Proc::spawn(&serve_args, &dir.join("serve1.log"));
    wait_healthy(&url, &server);
    let session = dir.join("session.json");
    ok(&[
        "remote",
        "register",
        "--server",
        &url,
        "--model",
        "forest",
        "--server-key",
        s(&keys.join("server.key")),
        "-o",
        s(&session),
    ]);
    let sess: serde_json::Value = serde_json::from_slice(&std::fs::read(&session).unwrap()).unwrap();
    let (key, token) = (sess["key_id"].as_str().unwrap(), sess["token"].as_str().unwrap());

    // submit with no worker running: 45 samples in 15 tasks of 3
    let job = submit(&url, key, token, &ct);
    let st = get(&format!("{url}/jobs/{job}"), token);
    assert_eq!(
        (st["state"].as_str(), st["tasks"].as_u64(), st["samples"].as_u64()),
        (Some("queued"), Some(15), Some(45))
    );

    // the server dies with the job queued and comes back: nothing is lost
    server.kill();
    let server = Proc::spawn(&serve_args, &dir.join("serve2.log"));
    wait_healthy(&url, &server);
    let st = get(&format!("{url}/jobs/{job}"), token);
    assert_eq!((st["state"].as_str(), st["tasks_done"].as_u64()), (Some("queued"), Some(0)), "{st}");

    let worker = |name: &str| {
        Proc::spawn(
            &["worker", s(&model), "--queue", &pg.url, "--data-dir", s(&data), "--lease-seconds", "3", "--name", name],
            &dir.join(format!("{name}.log")),
        )
    };
    // a worker given a directory the server does not use refuses to start
    let lost = dir.join("not-the-data-dir");
    let err = fails(&["worker", s(&model), "--queue", &pg.url, "--data-dir", s(&lost)]);
    assert!(err.contains("not a veil serve data directory"), "{err}");
    // a worker with another compile of the model waits without taking this job's tasks
    let mut c = Proc::spawn(
        &["worker", s(&other), "--queue", &pg.url, "--data-dir", s(&data), "--name", "worker-c"],
        &dir.join("worker-c.log"),
    );
    let mut a = worker("worker-a");
    let b = worker("worker-b");

    // freeze worker-a while it holds a task, then kill it: that task is mid-evaluation
    let start = Instant::now();
    let killed_part = loop {
        assert!(start.elapsed() < Duration::from_secs(120), "worker-a never held a task:\n{}", a.log());
        if pg.query("SELECT count(*) FROM veil_tasks WHERE worker = 'worker-a'") == ["0"] {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        a.signal("-STOP");
        let held = pg.query("SELECT part FROM veil_tasks WHERE worker = 'worker-a' AND state = 'running'");
        if let Some(part) = held.first() {
            a.kill();
            break part.clone();
        }
        a.signal("-CONT");
        std::thread::sleep(Duration::from_millis(10));
    };

    let start = Instant::now();
    loop {
        let st = get(&format!("{url}/jobs/{job}"), token);
        match st["state"].as_str() {
            Some("done") => break,
            Some("failed") => panic!("the job failed: {st}\n{}", b.log()),
            _ => {}
        }
        assert!(start.elapsed() < Duration::from_secs(300), "the job did not finish: {st}\n{}", b.log());
        std::thread::sleep(Duration::from_millis(200));
    }

    c.kill();
    assert!(!c.log().contains("task claimed"), "worker-c took a task:\n{}", c.log());
    // every task completed exactly once; the killed one was taken over by worker-b
    let rows = pg.query(&format!(
        "SELECT part, state, completions, attempts, worker FROM veil_tasks WHERE job_id = '{job}' ORDER BY part"
    ));
    assert_eq!(rows.len(), 15, "{rows:?}");
    for row in &rows {
        let f: Vec<&str> = row.split('|').collect();
        assert_eq!((f[1], f[2]), ("done", "1"), "task {row}");
        if f[0] == killed_part {
            assert!(f[3].parse::<u32>().unwrap() >= 2 && f[4] == "worker-b", "killed task {row}");
        }
    }

    let metrics = ureq::get(&format!("{url}/metrics")).call().unwrap().into_string().unwrap();
    for line in ["veil_queue_depth 0", "veil_queue_tasks 0", "veil_queue_jobs_done 1", "veil_queue_samples 45"] {
        assert!(metrics.lines().any(|l| l == line), "no '{line}' in\n{metrics}");
    }
    // the data owner fetches the result; the job is then gone from the server
    let (yct, y) = (dir.join("y.ct"), dir.join("y.npy"));
    ok(&["remote", "fetch", "--session", s(&session), "--job", &job, "-o", s(&yct)]);
    let gone = ureq::get(&format!("{url}/jobs/{job}")).set("Authorization", &format!("Bearer {token}")).call();
    assert!(matches!(gone, Err(ureq::Error::Status(404, _))), "the job is still there after its fetch");
    assert_eq!(pg.query(&format!("SELECT count(*) FROM veil_tasks WHERE job_id = '{job}'")), ["0"]);
    assert!(!data.join("jobs").join(format!("{job}.0.in")).exists());
    ok(&["decrypt", s(&model), "--client-key", s(&keys.join("client.key")), "-i", s(&yct), "-o", s(&y)]);
    use ndarray_npy::ReadNpyExt;
    let read = |p: &Path| ndarray::ArrayD::<f32>::read_npy(std::fs::File::open(p).unwrap()).unwrap();
    assert_eq!(read(&y), read(&clear), "encrypted through the queue vs clear");

    // finished jobs expire: a server keeping them 7.2 s deletes a job nobody fetched
    drop(server);
    let mut args = serve_args.to_vec();
    args.extend(["--keep-jobs-hours", "0.002"]);
    let server = Proc::spawn(&args, &dir.join("serve3.log"));
    wait_healthy(&url, &server);
    let job2 = submit(&url, key, token, &ct);
    let start = Instant::now();
    let mut seen_done = false;
    loop {
        match ureq::get(&format!("{url}/jobs/{job2}")).set("Authorization", &format!("Bearer {token}")).call() {
            Ok(r) => {
                let st: serde_json::Value = serde_json::from_reader(r.into_reader()).unwrap();
                seen_done |= st["state"] == "done";
            }
            Err(ureq::Error::Status(404, _)) => break,
            Err(e) => panic!("{e}"),
        }
        assert!(start.elapsed() < Duration::from_secs(300), "job {job2} never expired:\n{}", server.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(seen_done, "job {job2} vanished before it was done");
    assert!(!data.join("jobs").join(format!("{job2}.0.in")).exists());
    assert!(!data.join("jobs").join(format!("{job2}.0.out")).exists());
    drop(b);
    drop(server);
}
