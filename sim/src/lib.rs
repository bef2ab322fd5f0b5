//! Simulation harness (see docs/SIMULATION.md).
