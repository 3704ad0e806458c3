//! OpenAPI schemas for the types whose JSON serde does not derive: units written as a number
//! or a string (`"256MiB"`, `"2s"`), and the `[verify]` settings written as a name or a
//! one-key table (`"all"`, `{ "sample": 0.05 }`).

use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{AdditionalProperties, ObjectBuilder, OneOfBuilder, Schema, Type};

/// A non-negative integer (the base unit) or a string with a unit.
pub(crate) fn number_or_text(what: &str, example: &str) -> RefOr<Schema> {
    OneOfBuilder::new()
        .item(
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .minimum(Some(0)),
        )
        .item(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .examples([example]),
        )
        .description(Some(format!(
            "a {what}: a number of its base unit, or a string with a unit (`{example}`)"
        )))
        .into()
}

/// One of `names`, or an object with the one number `key`.
pub(crate) fn name_or_table(names: &[&str], key: &str) -> RefOr<Schema> {
    OneOfBuilder::new()
        .item(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(names.iter().copied())),
        )
        .item(
            ObjectBuilder::new()
                .schema_type(Type::Object)
                .property(key, ObjectBuilder::new().schema_type(Type::Number))
                .required(key)
                .additional_properties(Some(AdditionalProperties::FreeForm(false))),
        )
        .into()
}
