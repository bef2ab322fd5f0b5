//! ddpushd library.
