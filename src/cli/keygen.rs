//! `narfs keygen`: a signing key pair in the formats of
//! `nix-store --generate-binary-cache-key`.

use super::fail;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// The key's name, e.g. cache.example.org-1
    name: String,
    /// Where the secret key goes (created with mode 0600)
    secret_file: PathBuf,
    /// Where the public key goes
    public_file: PathBuf,
}

pub fn run(a: Args) -> ExitCode {
    match keygen(&a.name, &a.secret_file, &a.public_file) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

fn keygen(name: &str, secret: &std::path::Path, public: &std::path::Path) -> Result<(), String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    if name.is_empty() || name.contains(':') || name.contains(char::is_whitespace) {
        return Err(format!(
            "invalid key name '{name}': it may not be empty or contain ':' or spaces"
        ));
    }
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .map_err(|e| format!("/dev/urandom: {e}"))?;
    let sk = crate::formats::keys::SecretKey::from_seed(name, seed);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(secret)
        .map_err(|e| format!("{}: {e}", secret.display()))?;
    std::io::Write::write_all(&mut f, sk.to_nix_string().as_bytes())
        .map_err(|e| format!("{}: {e}", secret.display()))?;
    std::fs::write(public, sk.public().to_nix_string())
        .map_err(|e| format!("{}: {e}", public.display()))
}
