//! People and what they may do: dashboard users and API tokens (the users file, with
//! argon2 password hashes and SHA-256 token hashes), their roles, and the principal a
//! request acts as; the people who sign in with their institution's account (`sso`,
//! `members`), the groups they belong to (`groups`) and all of them as read from the
//! store (`directory`). Used by the dashboard (`web`), the gateway and the CLI alike.

pub mod directory;
pub mod groups;
pub mod members;
pub mod own_keys;
pub mod sso;

use std::path::Path;

use argon2::password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, SaltString};
use argon2::Argon2;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Finance,
    Ops,
    /// Reads one institution's pages, invoices and keys.
    Institution,
    /// An institution user who also creates and revokes their institution's proxy keys.
    #[serde(rename = "institution_admin")]
    #[value(name = "institution_admin")]
    InstitutionAdmin,
    /// A person who signed in with their institution's account: their own keys, usage
    /// and quota, nothing of anyone else's.
    Member,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Finance => "finance",
            Role::Ops => "ops",
            Role::Institution => "institution",
            Role::InstitutionAdmin => "institution_admin",
            Role::Member => "member",
        }
    }

    /// Roles confined to one institution.
    pub fn is_institution(self) -> bool {
        matches!(
            self,
            Role::Institution | Role::InstitutionAdmin | Role::Member
        )
    }
}

/// An authenticated user or API token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub role: Role,
    /// Set exactly when `role` is confined to one institution (`is_institution`).
    pub institution: Option<String>,
    /// The person, when they signed in with their institution's account (`[[sso]]`) or
    /// presented their own proxy key to `/api/v1/me`: whose usage, keys and limits
    /// "My usage" shows. `None` for users of the users file and API tokens.
    pub person: Option<String>,
}

impl Principal {
    /// Admin and ops see the pipeline (raw rejected payloads of every institution).
    pub fn sees_pipeline(&self) -> bool {
        matches!(self.role, Role::Admin | Role::Ops)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserEntry {
    pub name: String,
    pub role: Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub institution: Option<String>,
    pub password_hash: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    pub name: String,
    pub role: Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub institution: Option<String>,
    /// SHA-256 (hex) of the token; tokens are random, so a fast hash is enough.
    pub token_hash: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsersFile {
    #[serde(default, rename = "user")]
    pub users: Vec<UserEntry>,
    #[serde(default, rename = "token")]
    pub tokens: Vec<TokenEntry>,
}

impl UsersFile {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        if !path.exists() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(path)?;
        let file: Self = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("users file {}: {e}", path.display()))?;
        for (name, role, inst) in file
            .users
            .iter()
            .map(|u| (&u.name, u.role, &u.institution))
            .chain(
                file.tokens
                    .iter()
                    .map(|t| (&t.name, t.role, &t.institution)),
            )
        {
            check_role(role, inst.as_deref())
                .map_err(|e| anyhow::anyhow!("users file {}: `{name}`: {e}", path.display()))?;
        }
        Ok(file)
    }

    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let text = format!(
            "# tokentally users and API tokens. Written by `tokentally users add` / `tokens add`;\n\
             # only hashes are stored.\n\n{}",
            toml::to_string(self)?
        );
        // Password and token hashes: readable by the owner only (0600), from creation on.
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let tmp = path.with_extension("tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }
}

pub fn check_role(role: Role, institution: Option<&str>) -> Result<(), String> {
    if role == Role::Member {
        return Err(
            "role member is for people who sign in with their institution's account ([[sso]]); \
             a user or token of the users file cannot have it"
                .into(),
        );
    }
    match (role.is_institution(), institution) {
        (true, Some(i)) if !i.is_empty() => Ok(()),
        (true, _) => Err(format!("role {} needs an institution", role.as_str())),
        (false, Some(_)) => {
            Err("only roles institution, institution_admin and member take an institution".into())
        }
        (false, None) => Ok(()),
    }
}

pub fn hash_password(password: &str) -> anyhow::Result<String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| anyhow::anyhow!("hashing password: {e}"))
}

#[cfg(test)]
pub fn verify_password(password: &str, hash: &str) -> bool {
    use argon2::PasswordVerifier as _;
    PasswordHash::new(hash).is_ok_and(|h| {
        Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

/// Verifies an argon2 password hash with caller-owned working memory. argon2 needs 19 MiB per check;
/// allocating it anew each time left the process tens of MiB larger per login (measured:
/// +19 MiB per failed login, never returned), so the login threads keep theirs.
pub fn verify_password_with(password: &str, hash: &str, blocks: &mut Vec<argon2::Block>) -> bool {
    let Ok(h) = PasswordHash::new(hash) else {
        return false;
    };
    let Ok(params) = argon2::Params::try_from(&h) else {
        return false;
    };
    let Ok(algorithm) = argon2::Algorithm::try_from(h.algorithm) else {
        return false;
    };
    let version = match h.version.map(argon2::Version::try_from).transpose() {
        Ok(v) => v.unwrap_or_default(),
        Err(_) => return false,
    };
    let (Some(salt), Some(expected)) = (h.salt, h.hash) else {
        return false;
    };
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
        return false;
    };
    let n = params.block_count();
    if blocks.len() < n {
        blocks.resize(n, argon2::Block::default());
    }
    let mut out = vec![0u8; expected.len()];
    let ok = Argon2::new(algorithm, version, params)
        .hash_password_into_with_memory(password.as_bytes(), salt, &mut out, &mut blocks[..n])
        .is_ok();
    // `Output` compares in constant time.
    ok && argon2::password_hash::Output::new(&out).is_ok_and(|o| o == expected)
}

pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A random secret as hex (session ids, CSRF tokens, API tokens, generated passwords).
pub fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

/// Longest user name and password a login form may carry; longer fields are refused
/// before anything else looks at them.
pub const MAX_USER_NAME: usize = 128;
pub const MAX_PASSWORD: usize = 1024;
