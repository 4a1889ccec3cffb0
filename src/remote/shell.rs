//! `iot-remote shell`.
