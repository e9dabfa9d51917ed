//! Files only the server's own user may read: the data directory is 0700, and what in it holds
//! children's data or secrets (the SEL database and its WAL, the demo tenant's secret, the
//! development keys) is 0600. Off Unix these are plain creations.

use std::fs::{self, OpenOptions};
use std::io;
use std::path::Path;

/// Creates `dir` (and missing parents) if it is missing, and makes it 0700: an existing
/// directory that others may read or enter is tightened.
pub(crate) fn private_dir(dir: &Path) -> io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)?;
    restrict(dir, 0o700)
}

/// Creates `file` empty if it is missing, and makes it 0600: an existing file that others may
/// read is tightened. Never truncates.
pub(crate) fn private_file(file: &Path) -> io::Result<()> {
    let mut options = OpenOptions::new();
    options.append(true).create(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(file)?;
    restrict(file, 0o600)
}

/// Makes `path` `mode` if it grants anything more.
fn restrict(path: &Path, mode: u32) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let permissions = fs::metadata(path)?.permissions();
        if permissions.mode() & 0o777 & !mode != 0 {
            tracing::info!(path = %path.display(), "made private (mode {mode:o})");
            fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
        }
    }
    #[cfg(not(unix))]
    let _ = (path, mode);
    Ok(())
}
