"""Scale-factor rewriters and mmdeploy function rewriters: filled in by the fix and mmdeploy issues."""
