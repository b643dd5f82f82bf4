//! The host's metrics exporter: finds every attached volume of this host by
//! its control socket (`<data_dir>/volumes/<id>/control.sock`), asks each
//! for its [`VolumeReport`], and serves them all at `GET /metrics`.
//!
//! Invariants:
//! 1. A scrape asks every socket at once and waits at most
//!    [`REQUEST_TIMEOUT`] for each; a volume that does not answer in time,
//!    answers with an error or sends an invalid report is left out of that
//!    scrape and counted in `shale_exporter_volume_errors` (a stale socket
//!    of a server that is gone is skipped silently).
//! 2. The exporter only reads: it never changes a volume.
//! 3. Only `GET`/`HEAD` of `/metrics` and `/` are served; anything else is
//!    refused with 404 or 405, and a request never stops the server.

use std::convert::Infallible;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request as HttpRequest, Response, StatusCode};
use tokio::net::TcpListener;

use super::exposition;
use super::report::{Family, Kind, Sample, VolumeReport};
use crate::control::{self, Request};

/// Longest wait for one volume's report.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A control socket found in the data directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub id: u64,
    pub path: PathBuf,
}

/// Every `volumes/<16 hex digits>/control.sock` under `data_dir`, by id.
pub fn endpoints(data_dir: &Path) -> Vec<Endpoint> {
    let Ok(dir) = std::fs::read_dir(data_dir.join("volumes")) else {
        return Vec::new();
    };
    let mut out: Vec<Endpoint> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name();
            let name = name.to_str()?;
            if name.len() != 16 {
                return None;
            }
            let id = u64::from_str_radix(name, 16).ok()?;
            let path = control::socket_path(&e.path());
            path.exists().then_some(Endpoint { id, path })
        })
        .collect();
    out.sort_by_key(|e| e.id);
    out
}

/// Why a volume's report is missing from a scrape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Missing {
    /// Nobody listens (the server is gone): not an error.
    Stale,
    /// The server answered badly or not in time.
    Error(String),
}

/// Ask the server at `ep` for its report.
pub async fn fetch(ep: &Endpoint) -> Result<VolumeReport, Missing> {
    let req = Request::Metrics { volume: ep.id };
    let reply = match tokio::time::timeout(REQUEST_TIMEOUT, control::request(&ep.path, &req)).await
    {
        Err(_) => {
            return Err(Missing::Error(format!(
                "{}: no reply in {REQUEST_TIMEOUT:?}",
                ep.path.display()
            )))
        }
        Ok(Err(control::ControlError::Io { source, .. }))
            if matches!(
                source.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
            ) =>
        {
            return Err(Missing::Stale)
        }
        Ok(Err(e)) => return Err(Missing::Error(e.to_string())),
        Ok(Ok(r)) => r,
    };
    let report = match (reply.ok, reply.report) {
        (true, Some(r)) => r,
        _ => {
            let why = reply
                .error
                .unwrap_or_else(|| "reply without a report".into());
            return Err(Missing::Error(format!("{}: {why}", ep.path.display())));
        }
    };
    if report.id != ep.id {
        return Err(Missing::Error(format!(
            "{}: report of volume {:016x}",
            ep.path.display(),
            report.id
        )));
    }
    report
        .validate()
        .map_err(|e| Missing::Error(e.to_string()))?;
    Ok(report)
}

/// The reports of every volume attached on this host, by volume name, and
/// the errors of those that could not be read.
pub async fn collect(data_dir: &Path) -> (Vec<VolumeReport>, Vec<String>) {
    let eps = endpoints(data_dir);
    let results = futures::future::join_all(eps.iter().map(fetch)).await;
    let mut reports = Vec::new();
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok(rep) => reports.push(rep),
            Err(Missing::Stale) => {}
            Err(Missing::Error(e)) => errors.push(e),
        }
    }
    reports.sort_by(|a, b| a.volume.cmp(&b.volume));
    (reports, errors)
}

/// One scrape: every volume's metrics and the exporter's own, as text.
pub async fn scrape(data_dir: &Path) -> String {
    let (reports, errors) = collect(data_dir).await;
    for e in &errors {
        log::warn!("metrics: {e}");
    }
    let host = vec![
        Family::new(
            "exporter_volumes",
            Kind::Gauge,
            None,
            "Attached volumes whose metrics this scrape collected",
        )
        .with(Sample::value(&[], reports.len() as f64)),
        Family::new(
            "exporter_volume_errors",
            Kind::Gauge,
            None,
            "Attached volumes whose metrics this scrape could not collect (see the exporter's log)",
        )
        .with(Sample::value(&[], errors.len() as f64)),
    ];
    exposition::encode(&reports, host).unwrap_or_else(|e| {
        log::error!("metrics: cannot encode: {e}");
        String::new()
    })
}

fn text(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

async fn handle(
    data_dir: PathBuf,
    req: HttpRequest<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let plain = "text/plain; charset=utf-8";
    let head = req.method() == Method::HEAD;
    if req.method() != Method::GET && !head {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, plain, "only GET\n".into());
        r.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return r;
    }
    let mut resp = match req.uri().path() {
        "/metrics" => text(
            StatusCode::OK,
            exposition::CONTENT_TYPE,
            scrape(&data_dir).await,
        ),
        "/" => text(
            StatusCode::OK,
            plain,
            "shale exporter: metrics of this host's attached volumes at /metrics\n".into(),
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            plain,
            "not found; try /metrics\n".into(),
        ),
    };
    if head {
        *resp.body_mut() = Full::new(Bytes::new());
    }
    resp
}

/// Serve `GET /metrics` for the volumes under `data_dir` on `listener`
/// until `shutdown` resolves; connections in progress are then dropped.
pub async fn serve(
    listener: TcpListener,
    data_dir: PathBuf,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    tokio::pin!(shutdown);
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    log::warn!("exporter accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let dir = data_dir.clone();
        conns.spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let dir = dir.clone();
                async move { Ok::<_, Infallible>(handle(dir, req).await) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(io, svc);
            if let Err(e) = conn.await {
                log::debug!("exporter connection from {peer}: {e}");
            }
        });
        while conns.try_join_next().is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_sockets_in_volume_directories() {
        let dir = tempfile::tempdir().unwrap();
        let vols = dir.path().join("volumes");
        for name in [
            "00000000000000aa",
            "00000000000000bb",
            "not-a-volume",
            "00000000000000cc",
        ] {
            std::fs::create_dir_all(vols.join(name)).unwrap();
        }
        std::fs::write(vols.join("00000000000000bb").join("control.sock"), b"").unwrap();
        std::fs::write(vols.join("00000000000000aa").join("control.sock"), b"").unwrap();
        std::fs::write(vols.join("not-a-volume").join("control.sock"), b"").unwrap();
        let ids: Vec<u64> = endpoints(dir.path()).iter().map(|e| e.id).collect();
        assert_eq!(ids, [0xaa, 0xbb]);
        assert!(endpoints(&dir.path().join("missing")).is_empty());
    }

    #[tokio::test]
    async fn a_stale_socket_is_skipped_and_a_scrape_still_answers() {
        let dir = tempfile::tempdir().unwrap();
        let vdir = dir.path().join("volumes").join("0000000000000001");
        std::fs::create_dir_all(&vdir).unwrap();
        // Bound then dropped: the file stays, nobody listens.
        drop(std::os::unix::net::UnixListener::bind(vdir.join("control.sock")).unwrap());
        let (reports, errors) = collect(dir.path()).await;
        assert!(reports.is_empty() && errors.is_empty(), "{errors:?}");
        let text = scrape(dir.path()).await;
        assert!(text.contains("shale_exporter_volumes 0"), "{text}");
    }
}
