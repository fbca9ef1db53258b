//! Keys, where requests carry them, and each shard's copy of the project and key directory.
//!
//! The directory is small and read on every request, so every shard keeps its own copy and
//! applies changes broadcast over the mesh: lookups take no lock and touch no other core.

use std::collections::HashMap;
use std::sync::Arc;

use rand::RngCore;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::store::{KeyRow, ProjectRow, Scope};
use crate::IdMap;

/// Random bytes in a key: 24 bytes print as the 48 hex digits the key formats require.
const KEY_RANDOM_BYTES: usize = 24;

pub const INGEST_KEY_PREFIX: &str = "mshr_";
pub const DASHBOARD_KEY_PREFIX: &str = "mshd_";

/// A new plain key for `scope`; only its hash is ever stored.
pub fn generate_key(scope: Scope) -> String {
    let mut bytes = [0u8; KEY_RANDOM_BYTES];
    rand::rng().fill_bytes(&mut bytes);
    let prefix = match scope {
        Scope::Ingest => INGEST_KEY_PREFIX,
        Scope::Dashboard => DASHBOARD_KEY_PREFIX,
    };
    format!("{prefix}{}", hex::encode(bytes))
}

pub fn hash_key(plain: &str) -> String {
    hex::encode(Sha256::digest(plain.as_bytes()))
}

#[derive(Clone, Copy, Debug)]
pub struct KeyEntry {
    pub id: Uuid,
    pub project_id: Uuid,
    pub scope: Scope,
    pub revoked: bool,
}

impl KeyEntry {
    /// A live key used for another project or outside its scope is forbidden (403).
    pub fn permits(&self, scope: Scope, project: Option<Uuid>) -> Result<(), Refusal> {
        if self.scope != scope || project.is_some_and(|p| p != self.project_id) {
            return Err(Refusal::Forbidden);
        }
        Ok(())
    }
}

/// Why a key was refused; each maps to one status code.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Missing or unknown key: 401.
    Unauthorized,
    /// A valid key on another project or without the scope: 403.
    Forbidden,
}

/// One shard's copy of every project and key.
#[derive(Default)]
pub struct Directory {
    projects: IdMap<Uuid, Arc<ProjectRow>>,
    slugs: HashMap<String, Uuid>,
    numbers: HashMap<i64, Uuid>,
    keys_by_hash: IdMap<String, KeyEntry>,
    key_rows: IdMap<Uuid, KeyRow>,
    /// Hashes of plain keys already seen to be known, so a busy SDK's key is hashed once per
    /// shard rather than on every request. Only known keys enter, so its size is bounded by the
    /// number of keys, whatever strangers send.
    known_hashes: std::cell::RefCell<IdMap<Box<str>, Box<str>>>,
}

impl Directory {
    pub fn apply_project(&mut self, row: ProjectRow) {
        if let Some(old) = self.projects.get(&row.id) {
            if old.slug != row.slug {
                self.slugs.remove(&old.slug);
            }
        }
        self.slugs.insert(row.slug.clone(), row.id);
        self.numbers.insert(row.number, row.id);
        self.projects.insert(row.id, Arc::new(row));
    }

    pub fn apply_key(&mut self, row: &KeyRow) {
        let entry = KeyEntry {
            id: row.id,
            project_id: row.project_id,
            scope: row.scope,
            revoked: row.revoked,
        };
        self.keys_by_hash.insert(row.key_hash.clone(), entry);
        self.key_rows.insert(row.id, row.clone());
    }

    /// A project by UUID, number or slug (PROTOCOL 3). New slugs are never all digits; one
    /// stored before numbers existed is still found when no project has it as its number.
    pub fn project(&self, reference: &str) -> Option<&Arc<ProjectRow>> {
        let id = Uuid::parse_str(reference)
            .ok()
            .or_else(|| self.number_of(reference).copied())
            .or_else(|| self.slugs.get(reference).copied())?;
        self.projects.get(&id)
    }

    /// A project by its number (PROTOCOL 8).
    pub fn project_by_number(&self, number: i64) -> Option<&Arc<ProjectRow>> {
        self.projects.get(self.numbers.get(&number)?)
    }

    fn number_of(&self, reference: &str) -> Option<&Uuid> {
        if reference.is_empty() || !reference.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        self.numbers.get(&reference.parse::<i64>().ok()?)
    }

    pub fn project_by_id(&self, id: &Uuid) -> Option<&Arc<ProjectRow>> {
        self.projects.get(id)
    }

    pub fn projects(&self) -> impl Iterator<Item = &Arc<ProjectRow>> {
        self.projects.values()
    }

    pub fn slug_taken(&self, slug: &str) -> bool {
        self.slugs.contains_key(slug)
    }

    pub fn key_by_id(&self, id: &Uuid) -> Option<&KeyEntry> {
        self.keys_by_hash.get(&self.key_rows.get(id)?.key_hash)
    }

    pub fn key_row(&self, id: &Uuid) -> Option<KeyRow> {
        self.key_rows.get(id).cloned()
    }

    /// The live key entry for a plain key.
    pub fn key(&self, plain: Option<&str>) -> Result<&KeyEntry, Refusal> {
        let plain = plain.ok_or(Refusal::Unauthorized)?;
        let memo = self
            .known_hashes
            .borrow()
            .get(plain)
            .map(|hash| self.keys_by_hash.get(&**hash));
        let entry = match memo {
            Some(entry) => entry,
            None => {
                let hash = hash_key(plain);
                let entry = self.keys_by_hash.get(&hash);
                if entry.is_some() {
                    self.known_hashes
                        .borrow_mut()
                        .insert(plain.into(), hash.into());
                }
                entry
            }
        };
        match entry {
            Some(entry) if !entry.revoked => Ok(entry),
            _ => Err(Refusal::Unauthorized),
        }
    }

    /// The live key `plain`, checked for `scope` and, when one is named, for `project`.
    pub fn authorize(
        &self,
        plain: Option<&str>,
        scope: Scope,
        project: Option<Uuid>,
    ) -> Result<KeyEntry, Refusal> {
        let entry = *self.key(plain)?;
        entry.permits(scope, project)?;
        Ok(entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_have_the_documented_format() {
        let key = generate_key(Scope::Ingest);
        assert!(key.starts_with("mshr_") && key.len() == 5 + 48);
        assert!(key[5..].bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(generate_key(Scope::Dashboard).starts_with("mshd_"));
    }
}
