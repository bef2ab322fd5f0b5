//! Client libraries.
