//! Integration tests of the coordinator: its store on SQLite and on PostgreSQL, and an
//! in-process coordinator on `127.0.0.1:0` with in-process agents.

mod audit;
mod blobstore;
mod controls;
mod docker;
mod edge;
mod environment;
mod folds;
mod idle;
mod metrics;
mod planner;
mod replicas;
mod retention;
mod review;
mod run;
mod sessions;
mod settle;
mod support;
mod tenants;
mod tls;
mod ui;
mod verify;
mod webdriver;
mod wedge;
