//! Local discovery: instances announce themselves in the runtime dir.
