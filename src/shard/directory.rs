//! Changing the directory of projects and keys: committed to the store first, then applied on
//! every shard, so no shard ever knows a project or key the store does not.

use super::mesh::ShardMsg;
use super::Shard;
use crate::store::Change;

/// Why a change of the project and key directory did not take effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirectoryError {
    /// Another project has the slug.
    SlugTaken,
    /// Storage did not commit the change.
    StorageUnavailable,
    /// The server is shutting down.
    ShuttingDown,
}

impl Shard {
    /// Commits directory changes (projects, keys), then applies them on every shard; Ok once
    /// all have them.
    pub async fn publish_directory(&self, changes: Vec<Change>) -> Result<(), DirectoryError> {
        let (ack, committed) = tokio::sync::oneshot::channel();
        self.store.submit(changes.clone(), Some(ack));
        match committed.await {
            Ok(Ok(())) => {}
            // Another node took the slug first (the database's unique constraint).
            Ok(Err(error)) if error.is_conflict() => return Err(DirectoryError::SlugTaken),
            Ok(Err(error)) => {
                tracing::error!(%error, "storing a directory change failed");
                return Err(DirectoryError::StorageUnavailable);
            }
            Err(_) => return Err(DirectoryError::ShuttingDown),
        }
        for change in changes {
            for to in 0..self.shard_count() {
                let applied = match &change {
                    Change::Project(row) => {
                        let row = row.clone();
                        self.mesh
                            .ask(to, |reply| ShardMsg::Project(row, Some(reply)))
                            .await
                    }
                    Change::Key(row) => {
                        let row = row.clone();
                        self.mesh
                            .ask(to, |reply| ShardMsg::Key(row, Some(reply)))
                            .await
                    }
                    Change::Issue(_) | Change::Event(_) => continue,
                };
                applied.map_err(|_| DirectoryError::ShuttingDown)?;
            }
        }
        Ok(())
    }
}
