//! Reading a tenant's audit log in `seq` order for verification, on a native connection of
//! its own rather than through sqlx's `Any` driver: verification hashes every entry, and the
//! driver's cost per row (a channel hop per row on SQLite, a decoded row per message on
//! PostgreSQL) bounded it at a third of what hashing alone does.
//!
//! - SQLite: one read statement on a read-only `rusqlite` connection, on a blocking thread
//!   (one statement is one consistent snapshot in WAL mode).
//! - PostgreSQL: `COPY (SELECT ...) TO STDOUT (FORMAT binary)` by ranges of `seq` on two
//!   connections taking turns, parsed as it streams.
//!
//! Either way the records arrive in pages of [`PAGE`] on a bounded channel, so reading runs
//! ahead of the hashing by at most two pages.

use bytes::{Buf, BytesMut};
use futures_util::TryStreamExt;
use sqlx::Connection;
use tokio::sync::mpsc::Sender;

use super::audit::EntryRef;
use super::sql::Sql;
use super::{DbKind, Doing, Store, StoreError};

/// Entries per page handed to the hashing.
pub(super) const PAGE: usize = 4096;

/// A page of entries, or why reading stopped.
pub(super) type PageRead = Result<Page, StoreError>;

/// Entries read for verification: their text fields side by side in one buffer (one
/// allocation per page, not nine per entry).
#[derive(Default)]
pub(super) struct Page {
    text: String,
    rows: Vec<Row>,
}

/// Where a text field lies in [`Page::text`]; `None` for NULL.
type Span = Option<(u32, u32)>;

struct Row {
    seq: i64,
    at: i64,
    task_id: Option<i64>,
    /// actor, action, job, lease, agent, details, leaf, chain.
    text: [Span; 8],
}

impl Page {
    fn with_capacity() -> Page {
        Page {
            text: String::with_capacity(PAGE * 512),
            rows: Vec::with_capacity(PAGE),
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    fn len(&self) -> usize {
        self.rows.len()
    }

    fn span(&mut self, field: Option<&str>) -> Span {
        field.map(|f| {
            let from = self.text.len() as u32;
            self.text.push_str(f);
            (from, f.len() as u32)
        })
    }

    /// The page's entries, borrowing its text.
    pub(super) fn entries<'a>(&'a self, tenant: &'a str) -> Vec<EntryRef<'a>> {
        let field = |s: Span| s.map(|(from, len)| &self.text[from as usize..(from + len) as usize]);
        self.rows
            .iter()
            .map(|r| EntryRef {
                tenant_id: tenant,
                seq: r.seq,
                at: r.at,
                actor: field(r.text[0]).unwrap_or_default(),
                action: field(r.text[1]).unwrap_or_default(),
                job_id: field(r.text[2]),
                task_id: r.task_id,
                lease_id: field(r.text[3]),
                agent_id: field(r.text[4]),
                details: field(r.text[5]).unwrap_or_default(),
                leaf: field(r.text[6]).unwrap_or_default(),
                chain: field(r.text[7]).unwrap_or_default(),
            })
            .collect()
    }
}

/// The columns read, in this order, by both stores.
const COLUMNS: &str =
    "seq, at, actor, action, job_id, task_id, lease_id, agent_id, details, leaf, chain";

impl Store {
    /// Send `tenant`'s entries with `after < seq <= upto` to `pages`, in `seq` order, then
    /// an empty page. Stops quietly when the receiver is gone (verification ended early).
    pub(super) async fn read_audit_log(
        &self,
        tenant: String,
        after: i64,
        upto: i64,
        pages: Sender<PageRead>,
    ) {
        let result = match self.kind {
            DbKind::Sqlite => {
                let path = sqlite_path(&self.url);
                let out = pages.clone();
                tokio::task::spawn_blocking(move || read_sqlite(path?, &tenant, after, upto, &out))
                    .await
                    .unwrap_or_else(|e| {
                        Err(StoreError::Corrupt {
                            what: "audit log",
                            detail: format!("the reading thread failed: {e}"),
                        })
                    })
            }
            DbKind::Postgres => read_postgres(&self.url, &tenant, after, upto, &pages).await,
        };
        let last = result.map(|()| Page::default());
        let _ = pages.send(last).await;
    }
}

impl Store {
    /// Read `tenant`'s whole log the way verification does, hashing nothing: how many entries.
    /// What reading alone costs (`fleetbox-bench audit` prints it next to verification).
    pub async fn audit_read_all(&self, tenant: &str) -> Result<u64, StoreError> {
        let (last,): (Option<i64>,) = Sql::new("SELECT MAX(seq) FROM audit WHERE tenant_id = ")
            .bind(tenant)
            .build_as()
            .fetch_one(&self.read)
            .await
            .doing("reading the audit log")?;
        let (pages, mut next) = tokio::sync::mpsc::channel(2);
        let reader = {
            let store = self.clone();
            let tenant = tenant.to_string();
            let last = last.unwrap_or(0);
            tokio::spawn(async move { store.read_audit_log(tenant, 0, last, pages).await })
        };
        let mut n = 0;
        while let Some(page) = next.recv().await {
            let page = page?;
            if page.is_empty() {
                break;
            }
            n += page.len() as u64;
        }
        let _ = reader.await;
        Ok(n)
    }
}

/// The file of a `sqlite://PATH?options` URL.
fn sqlite_path(url: &str) -> Result<std::path::PathBuf, StoreError> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or(url);
    let path = rest.split('?').next().unwrap_or_default();
    if path.is_empty() || path.starts_with(":memory:") {
        return Err(StoreError::Corrupt {
            what: "audit log",
            detail:
                "verification reads the log from its database file; an in-memory database has none"
                    .into(),
        });
    }
    Ok(path.into())
}

fn read_sqlite(
    path: std::path::PathBuf,
    tenant: &str,
    after: i64,
    upto: i64,
    pages: &Sender<PageRead>,
) -> Result<(), StoreError> {
    use rusqlite::OpenFlags;
    let sqlite = |e: rusqlite::Error| StoreError::Corrupt {
        what: "audit log",
        detail: format!("reading the log from {}: {e}", path.display()),
    };
    let conn = rusqlite::Connection::open_with_flags(
        &path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sqlite)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(sqlite)?;
    let mut statement = conn
        .prepare(&format!(
            "SELECT {COLUMNS} FROM audit WHERE tenant_id = ?1 AND seq > ?2 AND seq <= ?3 ORDER BY seq"
        ))
        .map_err(sqlite)?;
    let mut rows = statement.query((tenant, after, upto)).map_err(sqlite)?;
    let mut page = Page::with_capacity();
    while let Some(row) = rows.next().map_err(sqlite)? {
        let mut text = [None; 8];
        // Columns 2, 3, 4, 6, 7, 8, 9, 10: the text fields in `Row::text`'s order.
        for (slot, column) in text.iter_mut().zip([2, 3, 4, 6, 7, 8, 9, 10]) {
            let value = row.get_ref(column).map_err(sqlite)?;
            let value = match value {
                rusqlite::types::ValueRef::Null => None,
                other => Some(other.as_str().map_err(|e| sqlite(e.into()))?),
            };
            *slot = page.span(value);
        }
        page.rows.push(Row {
            seq: row.get(0).map_err(sqlite)?,
            at: row.get(1).map_err(sqlite)?,
            task_id: row.get(5).map_err(sqlite)?,
            text,
        });
        if page.len() == PAGE {
            let full = std::mem::replace(&mut page, Page::with_capacity());
            if pages.blocking_send(Ok(full)).is_err() {
                return Ok(());
            }
        }
    }
    if !page.is_empty() {
        let _ = pages.blocking_send(Ok(page));
    }
    Ok(())
}

/// Entries per range one PostgreSQL connection copies out at a time.
const RANGE: i64 = 65_536;

/// Two connections take turns by range: while one range is hashed the server produces the
/// next two side by side (the server's ordered scan, not the parsing, is what one connection
/// waits on). Pages are forwarded in `seq` order; each connection runs ahead by at most two
/// pages.
async fn read_postgres(
    url: &str,
    tenant: &str,
    after: i64,
    upto: i64,
    pages: &Sender<PageRead>,
) -> Result<(), StoreError> {
    let ranges: Vec<(i64, i64)> = (after..upto)
        .step_by(RANGE as usize)
        .map(|from| (from, (from + RANGE).min(upto)))
        .collect();
    let mut readers = tokio::task::JoinSet::new();
    let mut turns = Vec::new();
    for k in 0..2 {
        let (out, turn) = tokio::sync::mpsc::channel(2);
        let mine: Vec<(i64, i64)> = ranges.iter().copied().skip(k).step_by(2).collect();
        if !mine.is_empty() {
            readers.spawn(copy_ranges(url.to_string(), tenant.to_string(), mine, out));
        }
        turns.push(turn);
    }
    for i in 0..ranges.len() {
        let turn = &mut turns[i % 2];
        loop {
            match turn.recv().await {
                // The end of this range.
                Some(Ok(page)) if page.is_empty() => break,
                Some(Ok(page)) => {
                    if pages.send(Ok(page)).await.is_err() {
                        return Ok(());
                    }
                }
                Some(Err(e)) => return Err(e),
                None => return Err(copy_error("a reading connection stopped early")),
            }
        }
    }
    Ok(())
}

/// Copy each of `ranges` (`from < seq <= to`) onto `out`, each followed by an empty page.
async fn copy_ranges(url: String, tenant: String, ranges: Vec<(i64, i64)>, out: Sender<PageRead>) {
    let result = async {
        let mut conn = sqlx::PgConnection::connect(&url)
            .await
            .doing("connecting to read the audit log")?;
        // COPY takes no parameters: the tenant goes in as a string literal (quotes doubled;
        // `standard_conforming_strings`, on by default since PostgreSQL 9.1, is forced here
        // so a backslash is just a backslash).
        sqlx::Executor::execute(&mut conn, "SET standard_conforming_strings = on")
            .await
            .doing("reading the audit log")?;
        let literal = format!("'{}'", tenant.replace('\'', "''"));
        for (from, to) in ranges {
            let copy = format!(
                "COPY (SELECT {COLUMNS} FROM audit WHERE tenant_id = {literal} AND seq > {from} \
                 AND seq <= {to} ORDER BY seq) TO STDOUT (FORMAT binary)"
            );
            if !copy_range(&mut conn, &copy, &out).await?
                || out.send(Ok(Page::default())).await.is_err()
            {
                return Ok(());
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        let _ = out.send(Err(e)).await;
    }
}

/// Stream one COPY onto `out` in full pages and a last partial one; `false` when the
/// receiver is gone.
async fn copy_range(
    conn: &mut sqlx::PgConnection,
    copy: &str,
    out: &Sender<PageRead>,
) -> Result<bool, StoreError> {
    let mut stream = conn
        .copy_out_raw(copy)
        .await
        .doing("reading the audit log")?;
    let mut buf = BytesMut::new();
    let mut parser = CopyParser::default();
    let mut page = Page::with_capacity();
    while let Some(chunk) = stream.try_next().await.doing("reading the audit log")? {
        buf.extend_from_slice(&chunk);
        while parser.next(&mut buf, &mut page)? {
            if page.len() == PAGE {
                let full = std::mem::replace(&mut page, Page::with_capacity());
                if out.send(Ok(full)).await.is_err() {
                    return Ok(false);
                }
            }
        }
    }
    if !parser.ended {
        return Err(copy_error("the copy ended before its trailer"));
    }
    if !page.is_empty() && out.send(Ok(page)).await.is_err() {
        return Ok(false);
    }
    Ok(true)
}

fn copy_error(detail: &str) -> StoreError {
    StoreError::Corrupt {
        what: "audit log",
        detail: format!("reading the log from PostgreSQL: {detail}"),
    }
}

/// PostgreSQL's binary COPY format: a signature and header, then per row a field count and
/// each field as a length (-1 for NULL) and its bytes, then a count of -1.
#[derive(Default)]
struct CopyParser {
    header: bool,
    ended: bool,
}

const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

impl CopyParser {
    /// Move the next whole row in `buf` onto `page`; `false` until more bytes arrive.
    fn next(&mut self, buf: &mut BytesMut, page: &mut Page) -> Result<bool, StoreError> {
        if !self.header {
            // Signature, flags, header extension length, the extension.
            if buf.len() < SIGNATURE.len() + 8 {
                return Ok(false);
            }
            if &buf[..SIGNATURE.len()] != SIGNATURE {
                return Err(copy_error("not a binary copy"));
            }
            let extension = u32::from_be_bytes(buf[15..19].try_into().expect("4 bytes")) as usize;
            if buf.len() < 19 + extension {
                return Ok(false);
            }
            buf.advance(19 + extension);
            self.header = true;
        }
        if self.ended {
            return Ok(false);
        }
        // Measure the whole row before taking anything from it.
        let Some(count) = buf.get(..2) else {
            return Ok(false);
        };
        let count = i16::from_be_bytes([count[0], count[1]]);
        if count == -1 {
            buf.advance(2);
            self.ended = true;
            return Ok(false);
        }
        if count != 11 {
            return Err(copy_error(&format!("a row of {count} fields, not 11")));
        }
        let mut at = 2usize;
        let mut fields: [Option<(usize, usize)>; 11] = [None; 11];
        for field in &mut fields {
            let Some(len) = buf.get(at..at + 4) else {
                return Ok(false);
            };
            let len = i32::from_be_bytes(len.try_into().expect("4 bytes"));
            at += 4;
            if len >= 0 {
                let len = len as usize;
                if buf.len() < at + len {
                    return Ok(false);
                }
                *field = Some((at, len));
                at += len;
            }
        }
        let bytes = &buf[..at];
        let int = |i: usize| -> Result<Option<i64>, StoreError> {
            fields[i]
                .map(|(from, len)| {
                    <[u8; 8]>::try_from(&bytes[from..from + len])
                        .map(i64::from_be_bytes)
                        .map_err(|_| copy_error("an integer field that is not 8 bytes"))
                })
                .transpose()
        };
        let seq = int(0)?.ok_or_else(|| copy_error("a NULL seq"))?;
        let time = int(1)?.ok_or_else(|| copy_error("a NULL time"))?;
        let task_id = int(5)?;
        let mut text = [None; 8];
        for (slot, column) in text.iter_mut().zip([2, 3, 4, 6, 7, 8, 9, 10]) {
            let value = fields[column]
                .map(|(from, len)| std::str::from_utf8(&bytes[from..from + len]))
                .transpose()
                .map_err(|_| copy_error("a text field that is not UTF-8"))?;
            *slot = page.span(value);
        }
        page.rows.push(Row {
            seq,
            at: time,
            task_id,
            text,
        });
        buf.advance(at);
        Ok(true)
    }
}
