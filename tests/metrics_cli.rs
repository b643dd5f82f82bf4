//! Observability end to end with the real binaries: `shale exporter`
//! scraped while fio writes through NBD to two volumes (counters move as
//! the workload does, `promtool check metrics` accepts the scrape, the
//! Grafana dashboard only uses emitted names), `shale status`, and
//! `shale top` driven in tmux as a person would.

#[path = "support/cli.rs"]
mod cli_support;
mod nbd_support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cli_support::CliEnv;
use nbd_support::{have_tool, run_ok};

const SHALE: &str = env!("CARGO_BIN_EXE_shale");
const MIB: u64 = 1 << 20;

/// A child process killed (and reaped) on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    /// SIGTERM, then wait; the process must exit 0.
    fn stop(mut self) {
        // SAFETY: kill(2) on a child we spawned and have not reaped yet.
        let rc = unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(rc, 0);
        let status = self.0.wait().expect("wait");
        assert!(status.success(), "exited with {status}");
    }
}

/// Spawn `shale --config CFG ARGS` and return it with its first stdout line.
fn spawn_shale(env: &CliEnv, args: &[&str]) -> (Proc, String) {
    let mut child = Command::new(SHALE)
        .env_remove("SHALE_CONFIG")
        .env("RUST_LOG", "warn")
        .arg("--config")
        .arg(&env.config)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn shale");
    let stdout = child.stdout.take().expect("stdout");
    let proc = Proc(child);
    let line = BufReader::new(stdout)
        .lines()
        .next()
        .expect("exited before its first line")
        .expect("read line");
    (proc, line)
}

fn env_with_volumes(names: &[&str]) -> CliEnv {
    let env = CliEnv::with_config("data_dir: data\nengine:\n  destage_interval_ms: 200\n");
    for n in names {
        env.ok(&["volume", "create", n, "--size", "64M"]);
    }
    env
}

/// `GET path` over HTTP/1.0; (status line, body).
fn http_get(addr: &str, path: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the exporter");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read response");
    let (head, body) = resp.split_once("\r\n\r\n").expect("header end");
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

/// Samples of a scrape: `name{labels}` → value.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// Sum of the samples of `name` whose labels include all of `labels`.
fn sum(s: &HashMap<String, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    s.iter()
        .filter(|(k, _)| {
            let (n, rest) = k.split_once('{').unwrap_or((k, ""));
            n == name
                && labels
                    .iter()
                    .all(|(lk, lv)| rest.contains(&format!("{lk}=\"{lv}\"")))
        })
        .map(|(_, v)| v)
        .sum()
}

fn promtool_accepts(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every metric name the dashboard's queries use is one the scrape has.
fn dashboard_uses_only(text: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/grafana/shale-dashboard.json");
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read dashboard"))
            .expect("dashboard is JSON");
    let mut exprs = Vec::new();
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(&dash, &mut exprs);
    assert!(exprs.len() >= 6, "the dashboard has panels with queries");
    // Names with samples, and every name a family declares (a family may
    // have no sample yet, e.g. errors before the first one).
    let mut emitted: std::collections::HashSet<String> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(String::from)
        .collect();
    for l in text.lines() {
        let mut words = l.split(' ');
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (words.next(), words.next(), words.next(), words.next())
        {
            emitted.insert(name.to_string());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    emitted.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    for e in &exprs {
        let mut found = 0;
        for (i, _) in e.match_indices("shale_") {
            let name: String = e[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            assert!(
                emitted.contains(name.as_str()),
                "{name} (in {e:?}) is not emitted"
            );
            found += 1;
        }
        assert!(found > 0, "query {e:?} uses no shale metric");
    }
    for panel in [
        "IOPS",
        "Latency p99",
        "Unstored",
        "Cache",
        "Store requests",
        "Lease",
    ] {
        assert!(
            dash.to_string().contains(panel),
            "the dashboard has no {panel:?} panel"
        );
    }
}

fn fio(uri: &str, args: &[&str]) -> Child {
    Command::new("fio")
        .args(["--name=w", "--ioengine=nbd", &format!("--uri={uri}")])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn fio")
}

#[test]
fn exporter_counts_fio_writes_to_two_volumes() {
    if !have_tool("fio", &["--enghelp=nbd"]) || !have_tool("promtool", &["--version"]) {
        return;
    }
    let env = env_with_volumes(&["alpha", "beta"]);
    let sock = env.path("nbd.sock");
    let (server, line) = spawn_shale(
        &env,
        &[
            "nbd",
            "serve",
            "alpha",
            "beta",
            "--socket",
            sock.to_str().unwrap(),
        ],
    );
    assert!(line.starts_with("listening on"), "{line}");
    let (exporter, line) = spawn_shale(&env, &["exporter", "--listen", "127.0.0.1:0"]);
    let addr = line
        .strip_prefix("listening on http://")
        .and_then(|l| l.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("{line}"))
        .to_string();

    let (status, body) = http_get(&addr, "/metrics");
    assert!(status.contains("200"), "{status}");
    let before = samples(&body);
    assert_eq!(before["shale_exporter_volumes"], 2.0, "{body}");
    let (status, _) = http_get(&addr, "/nothing");
    assert!(status.contains("404"), "{status}");

    // alpha: 8 MiB in 64 KiB writes; beta: 4 MiB in 4 KiB writes then the
    // same read back. Both at once, scraped while they run.
    let uri = |v: &str| format!("nbd+unix:///{v}?socket={}", sock.display());
    let mut a = fio(
        &uri("alpha"),
        &["--rw=write", "--bs=64k", "--size=8M", "--iodepth=4"],
    );
    let mut b = fio(
        &uri("beta"),
        &["--rw=write", "--bs=4k", "--size=4M", "--iodepth=8"],
    );
    let mut during = 0;
    while a.try_wait().unwrap().is_none() || b.try_wait().unwrap().is_none() {
        let (status, body) = http_get(&addr, "/metrics");
        assert!(status.contains("200"));
        assert!(samples(&body).contains_key("shale_exporter_volumes"));
        during += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(a.wait().unwrap().success() && b.wait().unwrap().success());
    eprintln!("{during} scrapes while fio ran");
    let mut r = fio(&uri("beta"), &["--rw=read", "--bs=4k", "--size=4M"]);
    assert!(r.wait().unwrap().success());

    // Wait (bounded) until both volumes stored everything.
    let deadline = Instant::now() + Duration::from_secs(60);
    let after = loop {
        let s = samples(&http_get(&addr, "/metrics").1);
        if sum(&s, "shale_unstored_bytes", &[]) == 0.0 || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let delta = |name: &str, labels: &[(&str, &str)]| {
        sum(&after, name, labels) - sum(&before, name, labels)
    };
    let w = |v: &'static str| [("volume", v), ("frontend", "nbd"), ("op", "write")];
    assert_eq!(delta("shale_requests_total", &w("alpha")), 128.0);
    assert_eq!(
        delta("shale_request_bytes_total", &w("alpha")),
        (8 * MIB) as f64
    );
    assert_eq!(delta("shale_requests_total", &w("beta")), 1024.0);
    assert_eq!(
        delta("shale_request_bytes_total", &w("beta")),
        (4 * MIB) as f64
    );
    let rd = [("volume", "beta"), ("op", "read")];
    assert_eq!(delta("shale_request_bytes_total", &rd), (4 * MIB) as f64);
    assert_eq!(
        delta(
            "shale_request_bytes_total",
            &[("volume", "alpha"), ("op", "read")]
        ),
        0.0
    );
    assert_eq!(
        delta("shale_request_duration_seconds_count", &w("beta")),
        1024.0,
        "every write is in the latency histogram"
    );
    assert_eq!(
        sum(&after, "shale_unstored_bytes", &[]),
        0.0,
        "destage finished"
    );
    for (v, bytes) in [("alpha", 8 * MIB), ("beta", 4 * MIB)] {
        let vol = [("volume", v)];
        assert!(
            delta("shale_destage_chunks_total", &vol) >= 1.0,
            "{v} destaged"
        );
        assert!(
            delta("shale_destage_bytes_total", &vol) >= bytes as f64,
            "{v}"
        );
        let puts = [("volume", v), ("method", "PUT"), ("outcome", "ok")];
        assert!(delta("shale_store_requests_total", &puts) >= 1.0, "{v}");
        assert!(
            delta("shale_store_written_bytes_total", &vol) >= bytes as f64,
            "{v}"
        );
        assert_eq!(sum(&after, "shale_lease_held", &vol), 1.0, "{v}");
        assert!(sum(&after, "shale_lease_expiry_seconds", &vol) > 0.0, "{v}");
        assert_eq!(sum(&after, "shale_request_errors_total", &vol), 0.0, "{v}");
    }
    assert!(
        delta(
            "shale_cost_store_requests_per_gib_written",
            &[("volume", "alpha")]
        ) > 0.0
    );

    let (_, text) = http_get(&addr, "/metrics");
    promtool_accepts(&text);
    dashboard_uses_only(&text);

    // shale status, as JSON and as a table.
    let json: serde_json::Value =
        serde_json::from_str(&env.ok(&["status", "--json", "--sample-ms", "100"])).unwrap();
    let vols = json["volumes"].as_array().unwrap();
    let names: Vec<&str> = vols.iter().map(|v| v["volume"].as_str().unwrap()).collect();
    assert_eq!(names, ["alpha", "beta"]);
    let alpha = &vols[0];
    assert_eq!(alpha["frontends"][0]["kind"], "nbd");
    assert!(
        alpha["cost"]["store_requests"]["PUT"].as_u64().unwrap() >= 1,
        "{alpha}"
    );
    assert_eq!(alpha["cost"]["written_bytes"].as_u64(), Some(8 * MIB));
    assert!(alpha["lease"]["expires_in_seconds"].as_f64().unwrap() > 0.0);
    let table = env.ok(&["status", "beta", "--sample-ms", "0"]);
    assert!(table.starts_with("VOLUME"), "{table}");
    assert!(
        table.lines().nth(1).unwrap().starts_with("beta "),
        "{table}"
    );
    assert!(!table.contains("alpha"), "{table}");
    env.fails(
        &["status", "gamma", "--sample-ms", "0"],
        "gamma is not attached",
    );

    server.stop();
    let s = samples(&http_get(&addr, "/metrics").1);
    assert_eq!(
        s["shale_exporter_volumes"], 0.0,
        "a stopped server's volumes are gone"
    );
    exporter.stop();
}

#[test]
fn top_refreshes_in_tmux_and_quits_on_q() {
    if !have_tool("tmux", &["-V"]) {
        return;
    }
    let env = env_with_volumes(&["tv"]);
    let sock = env.path("nbd.sock");
    let (server, _) = spawn_shale(
        &env,
        &["nbd", "serve", "tv", "--socket", sock.to_str().unwrap()],
    );
    let tmux_sock: PathBuf = env.path("tmux.sock");
    let tmux = |args: &[&str]| {
        let mut c = Command::new("tmux");
        c.arg("-S").arg(&tmux_sock).args(args);
        c
    };
    let cmd = format!("{SHALE} --config {} top --interval 1", env.config.display());
    run_ok(
        tmux(&[
            "new-session",
            "-d",
            "-s",
            "top",
            "-x",
            "160",
            "-y",
            "30",
            &cmd,
        ])
        .env_remove("SHALE_CONFIG"),
    );
    let screen = || {
        let out = tmux(&["capture-pane", "-p", "-t", "top"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    // Two refreshes: the header's clock changes, the volume row stays.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut first = String::new();
    let mut refreshed = false;
    while Instant::now() < deadline {
        let s = screen();
        if s.contains("shale top") && s.lines().any(|l| l.starts_with("tv ")) {
            if first.is_empty() {
                first = s;
            } else if s.lines().next() != first.lines().next() {
                refreshed = true;
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        !first.is_empty(),
        "no volume row on the screen:\n{}",
        screen()
    );
    assert!(refreshed, "the screen never refreshed:\n{first}");
    assert!(
        first.contains("VOLUME") && first.contains("nbd export tv"),
        "{first}"
    );
    assert!(first.contains("epoch 1"), "{first}");
    run_ok(&mut tmux(&["send-keys", "-t", "top", "q"]));
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut gone = false;
    while Instant::now() < deadline {
        if !tmux(&["has-session", "-t", "top"])
            .output()
            .unwrap()
            .status
            .success()
        {
            gone = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if !gone {
        let _ = tmux(&["kill-server"]).output();
    }
    assert!(gone, "q did not end shale top");
    server.stop();
}

#[test]
fn completions_and_man_pages_come_from_the_command_definitions() {
    let env = CliEnv::with_config("data_dir: data\n");
    let bash = env.ok(&["completions", "bash"]);
    assert!(
        bash.contains("complete -F") && bash.contains("exporter"),
        "{bash}"
    );
    let zsh = env.ok(&["completions", "zsh"]);
    assert!(zsh.starts_with("#compdef shale"), "{zsh}");
    let bad = env.run(&["completions", "cmd.exe"]);
    assert_eq!(bad.status.code(), Some(2), "a usage error");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid value"));
    let dir = env.path("man");
    env.ok(&["manpages", dir.to_str().unwrap()]);
    for page in ["shale.1", "shale-status.1", "shale-volume-create.1"] {
        let text =
            std::fs::read_to_string(dir.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.contains(".TH"), "{page} is a man page");
    }
    assert!(std::fs::read_to_string(dir.join("shale-status.1"))
        .unwrap()
        .contains("sample"));
}
