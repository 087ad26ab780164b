//! Downloading an archive for `POST /models?url=http://...`.
//!
//! Differences from TorchServe, each closing a hole: every redirect hop is checked against
//! `allowed_urls` (not only the first URL); connect and read timeouts apply; the body streams to
//! a temporary file in the model store (never whole into memory) and stops at
//! `max_download_size`; the file takes its name in the store only once the registration
//! succeeded, so a failed one leaves nothing behind and a retry is not answered 409.

use std::path::Path;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;

use crate::config::Config;
use crate::error::ErrorKind;
use crate::model::loading::{Loading, Phase};

/// Why a download failed.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// A redirect oxserve does not follow: to a URL allowed_urls does not allow, or not http://.
    #[error("{0}")]
    Refused(String),
    /// The transfer failed: unreachable, an error status, a timeout, over max_download_size, cut
    /// short, or the file could not be written.
    #[error("{0}")]
    Failed(String),
}

impl DownloadError {
    /// TorchServe answers a failed download with a 400 `DownloadArchiveException`
    /// (`ArchiveUtils.downloadArchive`); a refused redirect is a bad request.
    pub fn kind(&self) -> ErrorKind {
        match self {
            DownloadError::Refused(_) => ErrorKind::BadRequest,
            DownloadError::Failed(_) => ErrorKind::DownloadArchive,
        }
    }
}

/// Redirects followed at most (each one checked).
const MAX_REDIRECTS: usize = 5;

/// Downloads `url` into a fresh temporary file in `dir`; the file is removed when the returned
/// path is dropped without being persisted.
pub async fn fetch(
    url: &str,
    config: &Config,
    dir: &Path,
    loading: &Arc<Loading>,
) -> Result<tempfile::TempPath, DownloadError> {
    use DownloadError::{Failed, Refused};
    let limits = &config.download;
    // Redirects are followed here, by hand, so that each hop is checked like the first URL.
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(limits.connect_timeout)
        .read_timeout(limits.read_timeout)
        .build()
        .map_err(|e| Failed(format!("cannot download {url}: {e}")))?;
    let mut current = reqwest::Url::parse(url)
        .map_err(|e| Failed(format!("cannot download {url}: bad URL: {e}")))?;
    let mut hops = 0;
    let mut response = loop {
        let response = client
            .get(current.clone())
            .send()
            .await
            .map_err(|e| Failed(format!("cannot download {url}: {}", describe(&e))))?;
        if !response.status().is_redirection() {
            break response;
        }
        hops += 1;
        if hops > MAX_REDIRECTS {
            return Err(Failed(format!(
                "cannot download {url}: more than {MAX_REDIRECTS} redirects"
            )));
        }
        let location = response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                Failed(format!(
                    "cannot download {url}: {current} answered {} without a usable Location",
                    response.status()
                ))
            })?;
        let next = current.join(location).map_err(|e| {
            Failed(format!(
                "cannot download {url}: bad redirect {location:?}: {e}"
            ))
        })?;
        if next.scheme() != "http" {
            return Err(Refused(format!(
                "cannot download {url}: it redirects to {next}; oxserve downloads plain http:// URLs only"
            )));
        }
        if !config.url_allowed(next.as_str()) {
            return Err(Refused(format!(
                "Given URL {url} redirects to {next}, which does not match any allowed URL(s)"
            )));
        }
        current = next;
    };
    if !response.status().is_success() {
        return Err(Failed(format!(
            "cannot download {url}: the server answered {}",
            response.status()
        )));
    }
    let total = response.content_length();
    let too_big = |max: u64| {
        Failed(format!(
            "cannot download {url}: the archive is larger than max_download_size ({max} bytes)"
        ))
    };
    if let (Some(max), Some(len)) = (limits.max_size, total) {
        if len > max {
            return Err(too_big(max));
        }
    }
    loading.set_phase(Phase::Downloading, total.unwrap_or(0));
    let temp = tempfile::Builder::new()
        .prefix(".oxserve-download-")
        .suffix(".part")
        .tempfile_in(dir)
        .map_err(|e| {
            Failed(format!(
                "cannot download {url}: cannot create a file in {}: {e}",
                dir.display()
            ))
        })?
        .into_temp_path();
    let mut file = tokio::fs::File::create(&temp)
        .await
        .map_err(|e| Failed(format!("cannot write {}: {e}", temp.display())))?;
    let mut written: u64 = 0;
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| Failed(format!("cannot download {url}: {}", describe(&e))))?
    {
        written += chunk.len() as u64;
        if let Some(max) = limits.max_size {
            if written > max {
                return Err(too_big(max));
            }
        }
        file.write_all(&chunk)
            .await
            .map_err(|e| Failed(format!("cannot write {}: {e}", temp.display())))?;
        loading.advance(chunk.len() as u64);
    }
    if let Some(len) = total {
        if written != len {
            return Err(Failed(format!(
                "cannot download {url}: the body ended after {written} of {len} bytes"
            )));
        }
    }
    file.flush()
        .await
        .map_err(|e| Failed(format!("cannot write {}: {e}", temp.display())))?;
    Ok(temp)
}

/// A reqwest error with its cause (timeouts and refused connections say so).
fn describe(e: &reqwest::Error) -> String {
    let mut out = if e.is_timeout() {
        "timed out (download_connect_timeout / download_read_timeout)".to_string()
    } else {
        e.to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        out.push_str(&format!(": {s}"));
        source = s.source();
    }
    out
}
