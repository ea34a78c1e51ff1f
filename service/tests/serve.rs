//! The service on localhost with real keys and ciphertexts: results equal clear
//! execution; bad requests get clear 4xx answers and the service keeps serving; keys and
//! jobs survive a restart.

use ndarray::{ArrayD, Axis, Slice};
use ndarray_npy::ReadNpyExt;
use std::path::{Path, PathBuf};
use veil_backend::artifact::Artifact;
use veil_backend::pipeline::CompileOptions;
use veil_runtime::files::{self, CIPHERTEXT_LIMIT, SERVER_KEY_LIMIT};
use veil_runtime::{ClientKey, EncryptedOutputs};

fn models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/trees/rf_wine_3x3")
}

/// The 3-tree wine forest compiled with the tests on the client or on the server (two
/// models with different fingerprints), written to `dir`.
fn compile(dir: &Path, client_tests: bool) -> (Artifact, PathBuf) {
    let g = veil_frontend::onnx::import_file(models().join("model.onnx")).unwrap();
    let calib = ArrayD::<f32>::read_npy(std::fs::File::open(models().join("calib.npy")).unwrap()).unwrap();
    let mut opts = CompileOptions::default();
    opts.search.client_tree_tests = client_tests;
    let (a, _) = veil_backend::pipeline::compile(&g, &[veil_ir_tensor(calib)], &opts).unwrap();
    let path = dir.join(if client_tests { "forest.veil" } else { "forest_ranks.veil" });
    a.write(&path).unwrap();
    (a, path)
}

fn veil_ir_tensor(a: ArrayD<f32>) -> veil_ir::Tensor {
    veil_ir::Tensor::F32(a)
}

struct Server {
    url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(config: veil_service::Config) -> Server {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async move {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(l.local_addr().unwrap()).unwrap();
                veil_service::serve(config, l, async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
            });
        });
        let addr = addr_rx.recv().unwrap();
        Server { url: format!("http://{addr}"), stop: Some(stop), thread: Some(thread) }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        let _ = self.thread.take().map(|t| t.join());
    }
}

/// Status and body of a request (errors are answers too).
fn answer(r: Result<ureq::Response, ureq::Error>) -> (u16, Vec<u8>) {
    let r = match r {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("transport: {e}"),
    };
    let status = r.status();
    let mut body = Vec::new();
    std::io::Read::read_to_end(&mut r.into_reader(), &mut body).unwrap();
    (status, body)
}

fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(body)))
}

fn decrypt(a: &Artifact, ck: &ClientKey, bytes: &[u8], x: &veil_ir::Tensor) -> Vec<veil_ir::Tensor> {
    let out: EncryptedOutputs = files::from_bytes(bytes, CIPHERTEXT_LIMIT).unwrap();
    let ints = a.client.decode_integers(&ck.decrypt(&out).unwrap()).unwrap();
    a.client.finish(&ints, std::slice::from_ref(x)).unwrap()
}

#[test]
fn encrypted_requests_end_to_end_and_their_failure_modes() {
    let dir = std::env::temp_dir().join(format!("veil-serve-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (a, model) = compile(&dir, true);
    let (other, other_model) = compile(&dir, false);
    let mut config = veil_service::Config::new(vec![model.clone(), other_model], dir.join("data"));
    config.max_request_bytes = 64 << 10;
    let server = Server::start(config.clone());
    let url = server.url.clone();

    let (status, body) = answer(ureq::get(&format!("{url}/models")).call());
    assert_eq!(status, 200);
    let names: Vec<String> =
        json(&body)["models"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap().to_string()).collect();
    assert_eq!(names, ["forest", "forest_ranks"]);

    let (ck, sk) = veil_runtime::keygen(&a.params, &a.fingerprint).unwrap();
    let key_bytes = files::to_bytes(&sk, SERVER_KEY_LIMIT).unwrap();
    // a key made for the other model, and a truncated key: 400, nothing registered
    let (_, other_sk) = veil_runtime::keygen(&other.params, &other.fingerprint).unwrap();
    let other_bytes = files::to_bytes(&other_sk, SERVER_KEY_LIMIT).unwrap();
    let (status, body) = answer(ureq::post(&format!("{url}/models/forest/keys")).send_bytes(&other_bytes));
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    assert!(json(&body)["error"].as_str().unwrap().contains("fingerprint"), "{}", String::from_utf8_lossy(&body));
    let (status, body) =
        answer(ureq::post(&format!("{url}/models/forest/keys")).send_bytes(&key_bytes[..key_bytes.len() / 2]));
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    // (small bodies where the answer comes before the body is read: a client still
    // sending would see the connection close)
    let (status, _) = answer(ureq::post(&format!("{url}/models/nonesuch/keys")).send_bytes(b"key"));
    assert_eq!(status, 404);

    // register, then run synchronously: the decrypted outputs are clear execution's
    let (status, body) = answer(ureq::post(&format!("{url}/models/forest/keys")).send_bytes(&key_bytes));
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    let reg = json(&body);
    let (key, token) = (reg["key_id"].as_str().unwrap().to_string(), reg["token"].as_str().unwrap().to_string());
    let all = ArrayD::<f32>::read_npy(std::fs::File::open(models().join("test_x.npy")).unwrap()).unwrap();
    let x = veil_ir_tensor(all.slice_axis(Axis(0), Slice::from(0..3)).to_owned());
    let cts = ck.encrypt_for(&a.circuit, &a.client.encode(std::slice::from_ref(&x)).unwrap());
    let ct_bytes = files::to_bytes(&cts, CIPHERTEXT_LIMIT).unwrap();
    let auth = format!("Bearer {token}");
    let run = format!("{url}/keys/{key}/run");
    let (status, body) = answer(ureq::post(&run).set("Authorization", &auth).send_bytes(&ct_bytes));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let clear = a.quantized_model().unwrap().run_clear(std::slice::from_ref(&x)).unwrap();
    assert_eq!(decrypt(&a, &ck, &body, &x), clear);

    // no token, a wrong token, garbage, an oversized body: 4xx, and the service serves on
    let (status, _) = answer(ureq::post(&run).send_bytes(&ct_bytes));
    assert_eq!(status, 401);
    let (status, _) = answer(ureq::post(&run).set("Authorization", "Bearer 00").send_bytes(&ct_bytes));
    assert_eq!(status, 401);
    let (status, body) = answer(ureq::post(&run).set("Authorization", &auth).send_bytes(b"not a ciphertext"));
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    let (status, _) = answer(ureq::post(&run).set("Authorization", &auth).send_bytes(&vec![0u8; 65 << 10]));
    assert_eq!(status, 413);
    assert_eq!(answer(ureq::get(&format!("{url}/health")).call()).0, 200);

    // a job: queued, then done, with the same result
    let (status, body) =
        answer(ureq::post(&format!("{url}/keys/{key}/jobs")).set("Authorization", &auth).send_bytes(&ct_bytes));
    assert_eq!(status, 202);
    let job = json(&body)["job_id"].as_str().unwrap().to_string();
    let status_url = format!("{url}/jobs/{job}");
    for _ in 0..600 {
        let (_, body) = answer(ureq::get(&status_url).set("Authorization", &auth).call());
        if json(&body)["state"] == "done" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(answer(ureq::get(&status_url).call()).0, 401, "a job needs its key's token");
    let (status, body) = answer(ureq::get(&format!("{status_url}/result")).set("Authorization", &auth).call());
    assert_eq!(status, 200);
    assert_eq!(decrypt(&a, &ck, &body, &x), clear);
    let (_, metrics) = answer(ureq::get(&format!("{url}/metrics")).call());
    let metrics = String::from_utf8(metrics).unwrap();
    assert!(metrics.contains("veil_samples_total 6") && metrics.contains("veil_jobs_done_total 1"), "{metrics}");

    // a restart keeps the key: the same token runs on a new process state
    drop(server);
    let server = Server::start(config);
    let run = format!("{}/keys/{key}/run", server.url);
    let (status, body) = answer(ureq::post(&run).set("Authorization", &auth).send_bytes(&ct_bytes));
    assert_eq!(status, 200);
    assert_eq!(decrypt(&a, &ck, &body, &x), clear);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Requests per client in the load test.
const PER_CLIENT: usize = 20;

#[test]
fn concurrent_clients_are_all_served() {
    // 8 clients × 20 synchronous requests of one sample each on the small forest: no
    // errors, every answer decrypts to clear execution; latency percentiles and the
    // overhead over evaluating the same batch in process are printed.
    let dir = std::env::temp_dir().join(format!("veil-load-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (a, model) = compile(&dir, true);
    let server = Server::start(veil_service::Config::new(vec![model], dir.join("data")));
    let (ck, sk) = veil_runtime::keygen(&a.params, &a.fingerprint).unwrap();
    let key_bytes = files::to_bytes(&sk, SERVER_KEY_LIMIT).unwrap();
    let (_, body) = answer(ureq::post(&format!("{}/models/forest/keys", server.url)).send_bytes(&key_bytes));
    let reg = json(&body);
    let run = format!("{}/keys/{}/run", server.url, reg["key_id"].as_str().unwrap());
    let auth = format!("Bearer {}", reg["token"].as_str().unwrap());
    let all = ArrayD::<f32>::read_npy(std::fs::File::open(models().join("test_x.npy")).unwrap()).unwrap();
    let x = veil_ir_tensor(all.slice_axis(Axis(0), Slice::from(0..1)).to_owned());
    let cts = ck.encrypt_for(&a.circuit, &a.client.encode(std::slice::from_ref(&x)).unwrap());
    let ct_bytes = files::to_bytes(&cts, CIPHERTEXT_LIMIT).unwrap();
    let clear = a.quantized_model().unwrap().run_clear(std::slice::from_ref(&x)).unwrap();
    // in process, the same batch
    let ev = veil_runtime::Evaluator::new(&a.circuit, &a.params, sk, &a.fingerprint).unwrap();
    let t = std::time::Instant::now();
    for _ in 0..5 {
        ev.run(&cts, &|_| {}).unwrap();
    }
    let in_process = t.elapsed().as_secs_f64() / 5.0;
    drop(ev);
    let start = std::time::Instant::now();
    let mut latencies: Vec<f64> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                scope.spawn(|| {
                    (0..PER_CLIENT)
                        .map(|_| {
                            let t = std::time::Instant::now();
                            let (status, body) =
                                answer(ureq::post(&run).set("Authorization", &auth).send_bytes(&ct_bytes));
                            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
                            assert_eq!(decrypt(&a, &ck, &body, &x), clear);
                            t.elapsed().as_secs_f64()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let wall = start.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
    let n = (8 * PER_CLIENT) as f64;
    assert_eq!(latencies.len(), 8 * PER_CLIENT);
    eprintln!(
        "{n} requests (8 clients × {PER_CLIENT}, one sample each) in {wall:.2} s: {:.1} requests/s, p50 {:.3} s, p99 {:.3} s; \
         in process {in_process:.3} s per batch, service {:.3} s per batch served (overhead {:+.1}%)",
        n / wall,
        pct(0.5),
        pct(0.99),
        wall / n,
        100.0 * (wall / n / in_process - 1.0)
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
