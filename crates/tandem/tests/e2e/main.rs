//! End-to-end tests of the `tandem` binary as users run it: a real server
//! process on a loopback port, the command line beside it, real Segment SDKs,
//! `kill -9` and SIGTERM. One test binary for all of them.

mod accessibility;
mod cli;
mod cluster;
mod common;
mod console;
mod crash;
mod demo;
mod destination;
mod fault;
mod import;
mod openapi;
mod sdk;
mod stream;
