//! Sans-IO serving policies (../DESIGN.md "Sans-IO core"): no tokio, no sockets, no clocks.
//! Time comes in as an argument (`now_us`), decisions come out as data.
