//! What the DICOM standard defines and several layers share (architecture.md's `dicom/`):
//! for now the data dictionary by keyword. Pure: no I/O, no clocks.
#![forbid(unsafe_code)]

pub mod dictionary;
