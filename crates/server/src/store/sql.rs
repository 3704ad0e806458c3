//! Statements with bound values, built without counting placeholders by hand.
//!
//! sqlx's own `QueryBuilder<Any>` writes `?` placeholders, which PostgreSQL rejects; both
//! databases accept `$N`. [`Sql`] is the same idea with `$N`: text and values are pushed
//! together, so a placeholder's number and its value cannot drift apart.

use sqlx::any::AnyArguments;
use sqlx::{Any, Arguments, Encode, Type};

/// Whether `text`, a fixed `SELECT 1 ... WHERE` with `$1..$n`, finds a row with `values`
/// bound in order.
pub(crate) async fn exists<'c, E>(
    on: E,
    text: &str,
    values: &[&str],
    doing: &'static str,
) -> Result<bool, super::StoreError>
where
    E: sqlx::Executor<'c, Database = Any>,
{
    use super::Doing;
    let mut query = sqlx::query_as::<_, (i64,)>(text);
    for v in values {
        query = query.bind(*v);
    }
    Ok(query.fetch_optional(on).await.doing(doing)?.is_some())
}

/// Whether `text`, a fixed `SELECT 1 ... WHERE` with `$1` a state and `$2` a time (ms), finds
/// a row: the reads that come before a sweep's or a poll's write.
pub(crate) async fn exists_at<'c, E>(
    on: E,
    text: &str,
    state: &str,
    at: i64,
    doing: &'static str,
) -> Result<bool, super::StoreError>
where
    E: sqlx::Executor<'c, Database = Any>,
{
    use super::Doing;
    let query = sqlx::query_as::<_, (i64,)>(text).bind(state).bind(at);
    Ok(query.fetch_optional(on).await.doing(doing)?.is_some())
}

/// A statement being built: text with `$N` placeholders and the values bound to them.
pub(crate) struct Sql<'q> {
    text: String,
    args: AnyArguments<'q>,
    bound: usize,
}

impl<'q> Sql<'q> {
    pub(crate) fn new(text: impl Into<String>) -> Sql<'q> {
        Sql {
            text: text.into(),
            args: AnyArguments::default(),
            bound: 0,
        }
    }

    /// Append SQL text.
    pub(crate) fn push(&mut self, text: &str) -> &mut Self {
        self.text.push_str(text);
        self
    }

    /// Append a placeholder for `value`.
    pub(crate) fn bind<T>(&mut self, value: T) -> &mut Self
    where
        T: 'q + Encode<'q, Any> + Type<Any>,
    {
        // Encoding into `AnyArguments` only copies the value into an enum: it cannot fail
        // for the types the store binds (integers, text, options of them).
        if let Err(e) = self.args.add(value) {
            unreachable!("binding a value failed: {e}");
        }
        self.bound += 1;
        self.text.push('$');
        self.text.push_str(&self.bound.to_string());
        self
    }

    /// Append ` AND {column} = $N` for `Some(value)`; nothing for `None` (a filter the caller
    /// may or may not ask for).
    pub(crate) fn and_eq<T>(&mut self, column: &str, value: Option<T>) -> &mut Self
    where
        T: 'q + Encode<'q, Any> + Type<Any>,
    {
        if let Some(v) = value {
            self.text.push_str(" AND ");
            self.text.push_str(column);
            self.text.push_str(" = ");
            self.bind(v);
        }
        self
    }

    /// Append `$a, $b, ...`, one placeholder per value (for `IN (...)`).
    pub(crate) fn bind_list<T, I>(&mut self, values: I) -> &mut Self
    where
        I: IntoIterator<Item = T>,
        T: 'q + Encode<'q, Any> + Type<Any>,
    {
        for (i, v) in values.into_iter().enumerate() {
            if i > 0 {
                self.text.push_str(", ");
            }
            self.bind(v);
        }
        self
    }

    /// Append `(..), (..)`, one parenthesized row per item, its values pushed by `row`.
    pub(crate) fn push_rows<I, F>(&mut self, items: I, mut row: F) -> &mut Self
    where
        I: IntoIterator,
        F: FnMut(&mut Values<'_, 'q>, I::Item),
    {
        for (i, item) in items.into_iter().enumerate() {
            if i > 0 {
                self.text.push_str(", ");
            }
            self.text.push('(');
            row(
                &mut Values {
                    sql: self,
                    first: true,
                },
                item,
            );
            self.text.push(')');
        }
        self
    }

    /// The statement, ready to run. The builder is spent: its values moved into the query.
    pub(crate) fn build(&mut self) -> sqlx::query::Query<'_, Any, AnyArguments<'_>> {
        let args = std::mem::take(&mut self.args);
        sqlx::query_with(self.text.as_str(), args)
    }

    /// As [`Sql::build`], for rows read into a `FromRow` type.
    pub(crate) fn build_as<T>(&mut self) -> sqlx::query::QueryAs<'_, Any, T, AnyArguments<'_>>
    where
        T: for<'r> sqlx::FromRow<'r, sqlx::any::AnyRow>,
    {
        let args = std::mem::take(&mut self.args);
        sqlx::query_as_with(self.text.as_str(), args)
    }

    #[cfg(test)]
    fn text(&self) -> &str {
        &self.text
    }
}

/// The values of one row of [`Sql::push_rows`], comma-separated.
pub(crate) struct Values<'s, 'q> {
    sql: &'s mut Sql<'q>,
    first: bool,
}

impl<'q> Values<'_, 'q> {
    pub(crate) fn bind<T>(&mut self, value: T) -> &mut Self
    where
        T: 'q + Encode<'q, Any> + Type<Any>,
    {
        self.comma();
        self.sql.bind(value);
        self
    }

    fn comma(&mut self) {
        if !self.first {
            self.sql.text.push_str(", ");
        }
        self.first = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_follow_the_values() {
        let mut sql = Sql::new("INSERT INTO t (a, b, c) VALUES ");
        sql.push_rows([(1i64, "x"), (2, "y")], |row, (n, s)| {
            row.bind(n).bind(s).bind(0i64);
        });
        sql.push(" WHERE k IN (").bind_list(["p", "q"]).push(")");
        assert_eq!(
            sql.text(),
            "INSERT INTO t (a, b, c) VALUES ($1, $2, $3), ($4, $5, $6) WHERE k IN ($7, $8)"
        );
        assert_eq!(sql.args.len(), 8);
    }
}
