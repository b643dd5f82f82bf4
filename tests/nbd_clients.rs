//! The NBD server driven by real clients from Debian packages: nbdinfo,
//! qemu-io, qemu-img, nbdcopy and fio's nbd engine. The server runs in
//! process on RAM disks, so every test can also check the bytes that
//! landed on the device. A missing client prints SKIP (fails under CI=true).

mod nbd_support;

use std::process::{Command, Stdio};

use nbd_support::*;

const MIB: u64 = 1 << 20;

#[test]
fn nbdinfo_lists_exports_with_sizes_over_tcp_and_unix() {
    if !have_tool("nbdinfo", &["--version"]) {
        return;
    }
    let (srv, _) = TestServer::memory(&[("alpha", 64 * MIB), ("beta", MIB)]);
    let out = run_ok(Command::new("nbdinfo").arg("--list").arg(srv.uri("")));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("export=\"alpha\""), "{text}");
    assert!(text.contains("export=\"beta\""), "{text}");
    assert!(text.contains("block_size_minimum: 512"), "{text}");
    assert!(text.contains("can_multi_conn: true"), "{text}");

    for (name, size) in [("alpha", 64 * MIB), ("beta", MIB)] {
        for uri in [srv.uri(name), srv.unix_uri(name)] {
            let out = run_ok(Command::new("nbdinfo").arg("--size").arg(&uri));
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                size.to_string()
            );
        }
    }
    let missing = Command::new("nbdinfo")
        .arg("--size")
        .arg(srv.uri("gamma"))
        .output()
        .unwrap();
    assert!(!missing.status.success(), "unknown export must be refused");
    srv.stop().unwrap();
}

#[test]
fn qemu_io_patterns_discard_and_write_zeroes() {
    if !have_tool("qemu-io", &["--version"]) {
        return;
    }
    let (srv, disks) = TestServer::memory(&[("vol", 16 * MIB), ("other", 16 * MIB)]);
    let uri = srv.uri("vol");
    run_ok(Command::new("qemu-io").args(["-f", "raw", &uri]).args([
        "-c",
        "write -P 0x5a 0 1M",
        "-c",
        "write -P 0xa5 1M 4k",
        "-c",
        "write -P 0x11 15M 1M",
        "-c",
        "aio_write -P 0x22 8M 64k",
        "-c",
        "aio_write -P 0x33 9M 64k",
        "-c",
        "aio_flush",
        "-c",
        "discard 64k 64k",
        "-c",
        "write -z 256k 128k",
        "-c",
        "flush",
    ]));
    // A second process (new connection) sees all of it.
    run_ok(Command::new("qemu-io").args(["-f", "raw", &uri]).args([
        "-c",
        "read -P 0x5a 0 64k",
        "-c",
        "read -P 0 64k 64k",
        "-c",
        "read -P 0x5a 128k 128k",
        "-c",
        "read -P 0 256k 128k",
        "-c",
        "read -P 0x5a 384k 640k",
        "-c",
        "read -P 0xa5 1M 4k",
        "-c",
        "read -P 0 1028k 4k",
        "-c",
        "read -P 0x22 8M 64k",
        "-c",
        "read -P 0x33 9M 64k",
        "-c",
        "read -P 0x11 15M 1M",
    ]));
    // A wrong expectation must fail, or the checks above prove nothing.
    let wrong = Command::new("qemu-io")
        .args(["-f", "raw", &uri, "-c", "read -P 0x77 0 4k"])
        .output()
        .unwrap();
    let wrong_text = String::from_utf8_lossy(&wrong.stdout);
    assert!(
        wrong_text.contains("Pattern verification failed"),
        "{wrong_text}"
    );

    let bytes = disks[0].snapshot();
    assert!(bytes[..64 << 10].iter().all(|&b| b == 0x5a));
    assert!(bytes[64 << 10..128 << 10].iter().all(|&b| b == 0));
    assert!(bytes[(1 << 20)..(1 << 20) + 4096]
        .iter()
        .all(|&b| b == 0xa5));
    assert!(bytes[(15 << 20)..].iter().all(|&b| b == 0x11));
    assert!(
        disks[1].snapshot().iter().all(|&b| b == 0),
        "other export untouched"
    );
    srv.stop().unwrap();
}

#[test]
fn qemu_img_convert_in_and_out_round_trips() {
    if !have_tool("qemu-img", &["--version"]) {
        return;
    }
    let size = 24 * MIB;
    let (srv, disks) = TestServer::memory(&[("img", size)]);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let back = dir.path().join("back.raw");
    let mut data = pattern(size as usize, 7);
    // Leave holes so the zero paths of the clients run too.
    data[(4 * MIB) as usize..(8 * MIB) as usize].fill(0);
    std::fs::write(&src, &data).unwrap();

    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(srv.uri("img")),
    );
    assert!(
        disks[0].snapshot() == data,
        "device holds the converted image"
    );
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(srv.uri("img"))
            .arg(&back),
    );
    run_ok(Command::new("cmp").arg(&src).arg(&back));
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(srv.uri("img")),
    );
    srv.stop().unwrap();
}

#[test]
fn nbdcopy_in_out_and_between_exports_with_multi_conn() {
    if !have_tool("nbdcopy", &["--version"]) {
        return;
    }
    let size = 32 * MIB;
    let (srv, disks) = TestServer::memory(&[("a", size), ("b", size)]);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let out = dir.path().join("out.raw");
    let data = pattern(size as usize, 11);
    std::fs::write(&src, &data).unwrap();

    run_ok(
        Command::new("nbdcopy")
            .arg("--connections=4")
            .arg(&src)
            .arg(srv.uri("a")),
    );
    assert!(disks[0].snapshot() == data);
    run_ok(
        Command::new("nbdcopy")
            .arg("--connections=4")
            .arg(srv.uri("a"))
            .arg(srv.unix_uri("b")),
    );
    assert!(disks[1].snapshot() == data);
    run_ok(Command::new("nbdcopy").arg(srv.uri("b")).arg(&out));
    run_ok(Command::new("cmp").arg(&src).arg(&out));
    srv.stop().unwrap();
}

#[test]
fn fio_nbd_engine_random_mix_verifies_crc32c() {
    if !have_tool("fio", &["--enghelp=nbd"]) {
        return;
    }
    let (srv, _) = TestServer::memory(&[("fio", 64 * MIB)]);
    let dir = tempfile::tempdir().unwrap();
    let out = run_ok(
        Command::new("fio")
            .current_dir(dir.path())
            .args([
                "--name=mix",
                "--ioengine=nbd",
                "--rw=randrw",
                "--rwmixread=40",
                "--bsrange=4k-64k",
                "--iodepth=32",
                "--numjobs=2",
                "--size=16M",
                "--offset_increment=32M",
                "--io_size=48M",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--group_reporting",
            ])
            .arg(format!("--uri={}", srv.uri("fio"))),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("err= 0"), "{text}");
    assert!(
        !text.contains("verify:"),
        "fio reported verify failures: {text}"
    );
    srv.stop().unwrap();
}

#[test]
fn many_clients_on_many_exports_at_once() {
    if !have_tool("qemu-io", &["--version"]) {
        return;
    }
    let names = ["e0", "e1", "e2", "e3"];
    let exports: Vec<(&str, u64)> = names.iter().map(|n| (*n, 8 * MIB)).collect();
    let (srv, disks) = TestServer::memory(&exports);
    let children: Vec<_> = names
        .iter()
        .enumerate()
        .flat_map(|(i, n)| {
            // Two writers per export on disjoint halves, all at once.
            (0..2).map(move |half| (i, *n, half))
        })
        .map(|(i, n, half)| {
            let pat = format!("0x{:02x}", 0x10 + i * 2 + half);
            let off = format!("{}M", half * 4);
            Command::new("qemu-io")
                .args(["-f", "raw", &srv.uri(n)])
                .args(["-c", &format!("write -P {pat} {off} 4M")])
                .args(["-c", &format!("read -P {pat} {off} 4M")])
                .stdout(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    for (i, d) in disks.iter().enumerate() {
        let bytes = d.snapshot();
        let half = (4 * MIB) as usize;
        assert!(bytes[..half].iter().all(|&b| b as usize == 0x10 + i * 2));
        assert!(bytes[half..].iter().all(|&b| b as usize == 0x11 + i * 2));
    }
    srv.stop().unwrap();
}
