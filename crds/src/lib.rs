//! wiremesh custom resources (group `wiremesh.io`).
#![forbid(unsafe_code)]
