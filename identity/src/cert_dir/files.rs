//! Reading and writing the directory's files: each written whole (a
//! temporary file, then a rename), keys readable by their owner only.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::CertError;

pub(super) fn read_file(path: &Path) -> Result<Vec<u8>, CertError> {
    fs::read(path).map_err(|source| CertError::Io {
        action: "read",
        path: path.to_owned(),
        source,
    })
}

/// Writes via a temporary file and a rename, so a reader never sees half a file; key
/// files are created with mode 0600 on unix.
pub(super) fn write_file(path: &Path, contents: &[u8], secret: bool) -> Result<PathBuf, CertError> {
    let io_err = |action, path: &Path| {
        let path = path.to_owned();
        move |source| CertError::Io {
            action,
            path,
            source,
        }
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp-{}", std::process::id()));
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("remove", &tmp)(e)),
    }
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = options.open(&tmp).map_err(io_err("write", &tmp))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(io_err("write", &tmp))?;
    drop(file);
    fs::rename(&tmp, path).map_err(io_err("write", path))?;
    Ok(path.to_owned())
}
