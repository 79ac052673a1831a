//! Client library (to come).
