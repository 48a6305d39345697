//! The SQLSTATE codes graywire itself emits, by name (PostgreSQL manual, Appendix A).
//!
//! Codes that come from a node are relayed untouched and never pass through here.

/// A five-character SQLSTATE code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SqlState(&'static str);

impl SqlState {
    pub const fn code(self) -> &'static str {
        self.0
    }

    /// 08006: the connection to the node failed.
    pub const CONNECTION_FAILURE: SqlState = SqlState("08006");
    /// 08P01: the client broke the protocol.
    pub const PROTOCOL_VIOLATION: SqlState = SqlState("08P01");
    /// 0A000: something PostgreSQL supports but graywire does not (yet).
    pub const FEATURE_NOT_SUPPORTED: SqlState = SqlState("0A000");
    /// 28000: unknown user or otherwise not allowed to connect.
    pub const INVALID_AUTHORIZATION_SPECIFICATION: SqlState = SqlState("28000");
    /// 28P01: wrong password.
    pub const INVALID_PASSWORD: SqlState = SqlState("28P01");
    /// 53300: the connection cap is reached.
    pub const TOO_MANY_CONNECTIONS: SqlState = SqlState("53300");
    /// 57P01: graywire is shutting down.
    pub const ADMIN_SHUTDOWN: SqlState = SqlState("57P01");
    /// 57P03: no suitable node could take the request in time.
    pub const CANNOT_CONNECT_NOW: SqlState = SqlState("57P03");
    /// 40001: the transaction was rolled back because its node died; safe to retry.
    pub const SERIALIZATION_FAILURE: SqlState = SqlState("40001");
    /// 40003: the node died while the statement or COMMIT ran; its outcome is unknown.
    pub const STATEMENT_COMPLETION_UNKNOWN: SqlState = SqlState("40003");
    /// 57014: the client cancelled a request graywire was holding.
    pub const QUERY_CANCELED: SqlState = SqlState("57014");
    /// 25P02: the transaction failed; commands are ignored until it ends.
    pub const IN_FAILED_SQL_TRANSACTION: SqlState = SqlState("25P02");
    /// XX000: a graywire bug.
    pub const INTERNAL_ERROR: SqlState = SqlState("XX000");
}

impl std::fmt::Display for SqlState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}
