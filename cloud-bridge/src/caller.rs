//! Who is calling, for both of the bridge's edges (the pharmacy API and the
//! sync endpoint), and how a store failure is answered: kept apart from
//! both so neither edge imports the other.

use axum::extract::FromRequestParts;
use axum::http::StatusCode;
use axum::http::request::Parts;
use cloud_store::StoreError;
use service_kit::clock::now_s;
use service_kit::http::{ApiError, Severity, bearer_token};
use sync_protocol::document::DocumentError;
use sync_protocol::ids::Role;
use sync_protocol::ticket::Actor;
use sync_protocol::token::Principal;

use crate::AppState;

/// The answer to a store failure: what the caller may know, and (for the
/// log layer) what went wrong.
pub fn refusal(error: StoreError) -> ApiError {
    match error {
        StoreError::NotFound(id) => ApiError::new(StatusCode::NOT_FOUND, "ticket_not_found", format!("no ticket {id}")),
        StoreError::Document(DocumentError::Ticket(error)) => error.into(),
        StoreError::Closed => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", error.to_string()),
        StoreError::TooMany { .. } => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "range_too_large", error.to_string())
        }
        StoreError::Unavailable(_) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable", "storage is unavailable; retry later")
                .logged(Severity::Warn, error)
        }
        other => ApiError::internal(other),
    }
}

/// The verified principal of a request's bearer token.
pub fn bearer_principal(parts: &Parts, state: &AppState) -> Result<Principal, ApiError> {
    Ok(state.verifier.verify(bearer_token(parts)?, now_s())?)
}

/// A pharmacist or admin, as an audit actor.
#[derive(Debug, Clone)]
pub struct PharmacyCaller(pub Actor);

impl FromRequestParts<AppState> for PharmacyCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        Ok(PharmacyCaller(PharmacySession::from_request_parts(parts, state).await?.actor))
    }
}

/// A pharmacy caller with the token it was verified from, for what
/// outlives the request (the live feed ends when the token does).
#[derive(Debug, Clone)]
pub struct PharmacySession {
    pub actor: Actor,
    pub principal: Principal,
}

impl FromRequestParts<AppState> for PharmacySession {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let principal = bearer_principal(parts, state)?;
        let role = principal
            .acting_role(Role::works_at_pharmacy)
            .ok_or_else(|| ApiError::new(StatusCode::FORBIDDEN, "forbidden_role", "this API serves the pharmacy"))?;
        let actor =
            Actor { user: principal.user.clone(), role, device: state.config.bridge.id.clone(), offline_login: false };
        Ok(PharmacySession { actor, principal })
    }
}

/// Who may read the medication catalogue: pharmacy staff, and edge nodes,
/// which keep a copy for their wards.
#[derive(Debug)]
pub struct CatalogueReader;

impl FromRequestParts<AppState> for CatalogueReader {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let principal = bearer_principal(parts, state)?;
        match principal.acting_role(|role| role.works_at_pharmacy() || role == Role::EdgeNode) {
            Some(_) => Ok(CatalogueReader),
            None => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden_role",
                "the catalogue serves the pharmacy and edge nodes",
            )),
        }
    }
}

/// An edge node, authenticated at the upgrade.
#[derive(Debug)]
pub struct EdgeCaller(pub Principal);

impl FromRequestParts<AppState> for EdgeCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let principal = bearer_principal(parts, state)?;
        if principal.acting_role(|role| role == Role::EdgeNode).is_none() {
            return Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden_role", "the sync endpoint serves edge nodes"));
        }
        Ok(EdgeCaller(principal))
    }
}
