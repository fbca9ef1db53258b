//! Exclusive project owners: one PostgreSQL session-level advisory lock per project, held on
//! this node's lock connection. Whoever holds it is the project's only owner; when the node
//! dies its session ends and PostgreSQL releases every lock it held, so the next node to ask
//! takes the project over.

use std::sync::mpsc;
use std::time::Duration;

use tokio::sync::oneshot;
use uuid::Uuid;

/// How often the lock connection is checked while idle: a node whose connection broke has
/// lost its locks, and must stop acting as an owner at once.
const CHECK_INTERVAL_MS: u64 = 500;
/// Pause between attempts to open the lock connection again.
const RECONNECT_BACKOFF_MS: u64 = 500;

pub enum LockCommand {
    Try {
        key: i64,
        reply: oneshot::Sender<bool>,
    },
    Release {
        key: i64,
    },
}

/// The lock key of a project: its id's low 64 bits (random in v4 and v7 ids), so that
/// projects of separate clusters sharing one database (in separate schemas) never collide.
pub fn lock_key(project_id: &Uuid) -> i64 {
    project_id.as_u64_pair().1 as i64
}

/// Opens the lock connection, reads the cluster's id (made by the first node), and starts the
/// lock thread. `lost` runs whenever the connection broke with locks held.
pub fn start(
    database_url: &str,
    lost: impl Fn() + Send + 'static,
) -> Result<(mpsc::Sender<LockCommand>, Uuid), String> {
    let mut client = connect(database_url)
        .map_err(|e| format!("cannot open the PostgreSQL lock connection: {e}"))?;
    let cluster_id = cluster_id(&mut client)
        .map_err(|e| format!("cannot read the cluster id from PostgreSQL: {e}"))?;
    let (commands, queue) = mpsc::channel();
    let url = database_url.to_owned();
    std::thread::Builder::new()
        .name("locks".into())
        .spawn(move || run(client, &url, queue, lost))
        .map_err(|e| format!("cannot start the lock thread: {e}"))?;
    Ok((commands, cluster_id))
}

fn connect(url: &str) -> Result<postgres::Client, postgres::Error> {
    postgres::Client::connect(url, postgres::NoTls)
}

/// The id every node of this database shares; the first node to ask makes it.
fn cluster_id(client: &mut postgres::Client) -> Result<Uuid, postgres::Error> {
    client.execute(
        "INSERT INTO cluster (singleton, id) VALUES (true, $1::text::uuid) ON CONFLICT DO NOTHING",
        &[&Uuid::new_v4().to_string()],
    )?;
    let row = client.query_one("SELECT id::text FROM cluster", &[])?;
    let id: String = row.get(0);
    Ok(Uuid::parse_str(&id).unwrap_or_default())
}

fn run(
    mut client: postgres::Client,
    url: &str,
    queue: mpsc::Receiver<LockCommand>,
    lost: impl Fn(),
) {
    let mut held = 0usize;
    loop {
        let command = match queue.recv_timeout(Duration::from_millis(CHECK_INTERVAL_MS)) {
            Ok(command) => Some(command),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let result = match command {
            Some(LockCommand::Try { key, reply }) => client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
                .map(|row| {
                    let taken: bool = row.get(0);
                    held += usize::from(taken);
                    let _ = reply.send(taken);
                }),
            Some(LockCommand::Release { key }) => client
                .execute("SELECT pg_advisory_unlock($1)", &[&key])
                .map(|_| held = held.saturating_sub(1)),
            None => client.simple_query("SELECT 1").map(drop),
        };
        if let Err(error) = result {
            tracing::error!(%error, held, "PostgreSQL lock connection lost: this node owns no project now");
            if held > 0 {
                lost();
            }
            held = 0;
            client = loop {
                match connect(url) {
                    Ok(client) => break client,
                    Err(_) => std::thread::sleep(Duration::from_millis(RECONNECT_BACKOFF_MS)),
                }
            };
        }
    }
}
