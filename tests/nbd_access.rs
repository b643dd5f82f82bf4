//! Who can reach a volume through `shale nbd serve`, tried with real
//! clients: the unix socket's mode and peer credentials (a client run as
//! `nobody`), export rules and the filtered `NBD_OPT_LIST`, and TLS with
//! client certificates from a CA made in the test (nbdinfo/nbdcopy over
//! `nbds://`, qemu-io with `tls-creds-x509`), including refused clients:
//! plaintext, no certificate, a certificate from another CA.

mod nbd_support;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use nbd_support::*;

const SHALE: &str = env!("CARGO_BIN_EXE_shale");

/// A running `shale nbd serve` whose log goes to a file.
struct Server {
    child: Child,
    log: PathBuf,
    listening: Vec<String>,
}

impl Server {
    /// Start with `config` (YAML) and `args`; wait for `expect` listen lines.
    fn start(dir: &Path, config: &str, args: &[&str], expect: usize) -> Server {
        let cfg = dir.join("shale.yaml");
        std::fs::write(
            &cfg,
            format!("data_dir: {}\n{config}", dir.join("data").display()),
        )
        .unwrap();
        let log = dir.join(format!("server-{}.log", args.len() + config.len()));
        let mut child = Command::new(SHALE)
            .env_remove("SHALE_CONFIG")
            .env("RUST_LOG", "info")
            .arg("--config")
            .arg(&cfg)
            .args(["nbd", "serve"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut listening = Vec::new();
        while listening.len() < expect {
            match lines.next() {
                Some(Ok(l)) => listening.push(l),
                _ => panic!(
                    "server exited before listening:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                ),
            }
        }
        Server {
            child,
            log,
            listening,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }

    /// The TCP port from a `listening on tcp:IP:PORT` line.
    fn port(&self) -> u16 {
        self.listening
            .iter()
            .find_map(|l| l.strip_prefix("listening on tcp:"))
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .expect("a TCP listener")
    }

    fn stop(mut self) {
        // SAFETY: kill(2) on a child we spawned and have not reaped yet.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(rc, 0);
        let status = self.child.wait().unwrap();
        assert!(
            status.success(),
            "server exited with {status}: {}",
            self.log()
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A directory everyone may traverse (so `nobody` reaches the socket and
/// only the socket's own mode decides).
fn open_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn unix_uri(sock: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", sock.display())
}

fn nbdinfo(args: &[&str]) -> Output {
    Command::new("nbdinfo").args(args).output().unwrap()
}

/// `nbdinfo ARGS` run as the user nobody.
fn nbdinfo_as_nobody(args: &[&str]) -> Output {
    Command::new("setpriv")
        .args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "nbdinfo",
        ])
        .args(args)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn can_switch_users() -> bool {
    if nix::unistd::geteuid().as_raw() != 0 {
        assert!(
            !ci(),
            "CI=true: these tests need root to run a client as nobody"
        );
        eprintln!("SKIP: not root, cannot run a client as another user");
        return false;
    }
    have_tool("setpriv", &["--version"])
}

#[test]
fn unix_socket_mode_and_peer_credentials_decide_who_connects() {
    if !have_tool("nbdinfo", &["--version"]) || !can_switch_users() {
        return;
    }
    let dir = open_dir();
    let sock = dir.path().join("nbd.sock");
    let sock_s = sock.to_str().unwrap();

    // Defaults: mode 0660, so nobody cannot even open the socket.
    let srv = Server::start(dir.path(), "", &["--socket", sock_s, "--memory", "a:1M"], 1);
    let meta = std::fs::metadata(&sock).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o660, "default socket mode");
    let out = nbdinfo(&["--size", &unix_uri(&sock, "a")]);
    assert!(out.status.success(), "root connects: {}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1048576");
    let out = nbdinfo_as_nobody(&["--size", &unix_uri(&sock, "a")]);
    assert!(!out.status.success(), "nobody must not connect");
    assert!(
        stderr(&out).contains("Permission denied"),
        "refused by the socket's mode: {}",
        stderr(&out)
    );
    srv.stop();

    // A world-writable socket: nobody reaches it, SO_PEERCRED refuses it.
    let open = "nbd:\n  socket_mode: \"0666\"\n";
    let srv = Server::start(
        dir.path(),
        open,
        &["--socket", sock_s, "--memory", "a:1M"],
        1,
    );
    let out = nbdinfo_as_nobody(&["--size", &unix_uri(&sock, "a")]);
    assert!(!out.status.success(), "nobody must be refused");
    assert!(
        srv.log()
            .contains("refusing connection from unix uid 65534"),
        "{}",
        srv.log()
    );
    assert!(nbdinfo(&["--size", &unix_uri(&sock, "a")]).status.success());
    srv.stop();

    // Allowing the user lets it in.
    let allowed = "nbd:\n  socket_mode: \"0666\"\n  allow_users: [nobody]\n";
    let srv = Server::start(
        dir.path(),
        allowed,
        &["--socket", sock_s, "--memory", "a:1M"],
        1,
    );
    let out = nbdinfo_as_nobody(&["--size", &unix_uri(&sock, "a")]);
    assert!(out.status.success(), "allowed user: {}", stderr(&out));
    srv.stop();
}

#[test]
fn export_rules_hide_exports_from_list_and_open() {
    if !have_tool("nbdinfo", &["--version"]) || !can_switch_users() {
        return;
    }
    let dir = open_dir();
    let sock = dir.path().join("nbd.sock");
    let sock_s = sock.to_str().unwrap();
    let config = "nbd:
  socket_mode: \"0666\"
  allow_users: [nobody]
  access:
    - exports: [mine]
      clients: [user:nobody]
    - exports: ['*']
      clients: [user:root]
";
    let srv = Server::start(
        dir.path(),
        config,
        &[
            "--socket",
            sock_s,
            "--memory",
            "mine:1M",
            "--memory",
            "secret:2M",
        ],
        1,
    );
    let list_uri = format!("nbd+unix:///?socket={sock_s}");
    let names = |o: &Output| -> Vec<String> {
        let text = String::from_utf8_lossy(&o.stdout);
        let mut v: Vec<String> = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("export=\""))
            .filter_map(|l| l.split('"').next())
            .map(String::from)
            .collect();
        v.sort();
        v
    };
    let root = nbdinfo(&["--list", &list_uri]);
    assert!(root.status.success(), "{}", stderr(&root));
    assert_eq!(names(&root), ["mine", "secret"]);
    let nobody = nbdinfo_as_nobody(&["--list", &list_uri]);
    assert!(nobody.status.success(), "{}", stderr(&nobody));
    assert_eq!(
        names(&nobody),
        ["mine"],
        "LIST shows only what nobody may open"
    );
    let mine = nbdinfo_as_nobody(&["--size", &unix_uri(&sock, "mine")]);
    assert!(mine.status.success(), "{}", stderr(&mine));
    let secret = nbdinfo_as_nobody(&["--size", &unix_uri(&sock, "secret")]);
    assert!(!secret.status.success(), "nobody may not open secret");
    assert!(
        srv.log().contains("which the access rules do not give it"),
        "{}",
        srv.log()
    );
    srv.stop();
}

/// A CA, a server certificate for 127.0.0.1 and client certificates, made
/// with certtool (GnuTLS).
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn certtool(&self, args: &[&str]) {
        run_ok(Command::new("certtool").current_dir(&self.dir).args(args));
    }

    fn key(&self, name: &str) {
        self.certtool(&[
            "--generate-privkey",
            "--key-type=ecdsa",
            "--outfile",
            &format!("{name}-key.pem"),
        ]);
    }

    fn template(&self, name: &str, text: &str) -> String {
        let file = format!("{name}.info");
        std::fs::write(self.dir.join(&file), text).unwrap();
        file
    }

    fn ca(&self, name: &str) {
        self.key(name);
        let t = self.template(
            name,
            &format!("cn = \"{name}\"\nca\ncert_signing_key\nexpiration_days = 3\n"),
        );
        self.certtool(&[
            "--generate-self-signed",
            "--load-privkey",
            &format!("{name}-key.pem"),
            "--template",
            &t,
            "--outfile",
            &format!("{name}-cert.pem"),
        ]);
    }

    /// A certificate `name` signed by `ca`, for a server or a client.
    fn cert(&self, name: &str, ca: &str, server: bool) {
        self.key(name);
        let usage = if server {
            "ip_address = \"127.0.0.1\"\ndns_name = \"localhost\"\ntls_www_server\nencryption_key\n"
        } else {
            "tls_www_client\n"
        };
        let t = self.template(
            name,
            &format!("cn = \"{name}\"\n{usage}signing_key\nexpiration_days = 3\n"),
        );
        self.certtool(&[
            "--generate-certificate",
            "--load-privkey",
            &format!("{name}-key.pem"),
            "--load-ca-certificate",
            &format!("{ca}-cert.pem"),
            "--load-ca-privkey",
            &format!("{ca}-key.pem"),
            "--template",
            &t,
            "--outfile",
            &format!("{name}-cert.pem"),
        ]);
    }

    /// A directory in the layout libnbd and qemu expect (ca-cert.pem,
    /// client-cert.pem, client-key.pem); `client` None leaves the client
    /// certificate out.
    fn client_dir(&self, name: &str, ca: &str, client: Option<&str>) -> PathBuf {
        let d = self.dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(
            self.dir.join(format!("{ca}-cert.pem")),
            d.join("ca-cert.pem"),
        )
        .unwrap();
        if let Some(c) = client {
            std::fs::copy(
                self.dir.join(format!("{c}-cert.pem")),
                d.join("client-cert.pem"),
            )
            .unwrap();
            std::fs::copy(
                self.dir.join(format!("{c}-key.pem")),
                d.join("client-key.pem"),
            )
            .unwrap();
        }
        d
    }
}

#[test]
fn tls_with_client_certificates_and_refused_clients() {
    if !have_tool("nbdinfo", &["--version"])
        || !have_tool("nbdcopy", &["--version"])
        || !have_tool("qemu-io", &["--version"])
        || !have_tool("certtool", &["--version"])
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki {
        dir: dir.path().join("pki"),
    };
    std::fs::create_dir_all(&pki.dir).unwrap();
    pki.ca("ca");
    pki.cert("server", "ca", true);
    pki.cert("client-a", "ca", false);
    pki.cert("client-b", "ca", false);
    pki.ca("rogue-ca");
    pki.cert("rogue", "rogue-ca", false);
    let p = |n: &str| pki.dir.join(n).display().to_string();
    let config = format!(
        "nbd:
  tls:
    cert: {}
    key: {}
    client_ca: {}
  access:
    - exports: [a]
      clients: [cert:client-a]
    - exports: ['*']
      clients: [cert:client-b]
",
        p("server-cert.pem"),
        p("server-key.pem"),
        p("ca-cert.pem")
    );
    let srv = Server::start(
        dir.path(),
        &config,
        &[
            "--listen",
            "127.0.0.1:0",
            "--memory",
            "a:4M",
            "--memory",
            "b:4M",
        ],
        1,
    );
    let port = srv.port();
    let good_a = pki.client_dir("good-a", "ca", Some("client-a"));
    let good_b = pki.client_dir("good-b", "ca", Some("client-b"));
    let no_cert = pki.client_dir("no-cert", "ca", None);
    let rogue = pki.client_dir("rogue-dir", "ca", Some("rogue"));
    let nbds = |export: &str, certs: &Path| {
        format!(
            "nbds://127.0.0.1:{port}/{export}?tls-certificates={}",
            certs.display()
        )
    };

    // Good clients: sizes, a copy in and out with nbdcopy, qemu-io.
    let out = nbdinfo(&["--size", &nbds("a", &good_a)]);
    assert!(out.status.success(), "client-a opens a: {}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "4194304");
    let image = dir.path().join("in.img");
    std::fs::write(&image, pattern(4 << 20, 9)).unwrap();
    run_ok(Command::new("nbdcopy").arg(&image).arg(nbds("a", &good_a)));
    let back = dir.path().join("out.img");
    run_ok(Command::new("nbdcopy").arg(nbds("a", &good_a)).arg(&back));
    assert!(
        file_bytes(&back) == pattern(4 << 20, 9),
        "nbdcopy round trip over TLS"
    );
    run_ok(
        Command::new("qemu-io")
            .arg("--object")
            .arg(format!(
                "tls-creds-x509,id=tls0,endpoint=client,dir={}",
                good_b.display()
            ))
            .arg("--image-opts")
            .arg(format!(
                "driver=nbd,host=127.0.0.1,port={port},export=b,tls-creds=tls0"
            ))
            .args(["-c", "write -P 0x5a 0 1M", "-c", "read -P 0x5a 0 1M"]),
    );

    // The export gate by certificate name, and the filtered list.
    let out = nbdinfo(&["--size", &nbds("b", &good_a)]);
    assert!(!out.status.success(), "client-a may not open b");
    let list = nbdinfo(&["--list", &nbds("", &good_a)]);
    assert!(list.status.success(), "{}", stderr(&list));
    let listed = String::from_utf8_lossy(&list.stdout);
    assert!(listed.contains("export=\"a\""), "{listed}");
    assert!(!listed.contains("export=\"b\""), "{listed}");

    // Refused: plaintext, no client certificate, a certificate of another CA.
    let plain = nbdinfo(&["--size", &format!("nbd://127.0.0.1:{port}/a")]);
    assert!(!plain.status.success(), "plaintext must be refused");
    let out = nbdinfo(&["--size", &nbds("a", &no_cert)]);
    assert!(
        !out.status.success(),
        "a client without a certificate must be refused"
    );
    let out = nbdinfo(&["--size", &nbds("a", &rogue)]);
    assert!(
        !out.status.success(),
        "a certificate of another CA must be refused"
    );
    let log = srv.log();
    assert!(log.contains("TLS handshake with"), "{log}");
    assert!(
        log.contains("TLS established with 127.0.0.1 (certificate \"client-a\")"),
        "{log}"
    );
    srv.stop();
}

#[test]
fn plain_tcp_on_a_public_address_warns_and_no_tcp_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let sock_s = sock.to_str().unwrap();
    // The default config listens on its socket only.
    let config = format!("nbd:\n  socket: {sock_s}\n");
    let srv = Server::start(dir.path(), &config, &["--memory", "a:1M"], 1);
    assert_eq!(srv.listening, [format!("listening on unix:{sock_s}")]);
    srv.stop();
    // A plain TCP listener on the wildcard address is reported.
    let srv = Server::start(
        dir.path(),
        "",
        &["--listen", "0.0.0.0:0", "--memory", "a:1M"],
        1,
    );
    assert!(
        srv.log().contains("plain TCP listener on 0.0.0.0"),
        "{}",
        srv.log()
    );
    srv.stop();
}
