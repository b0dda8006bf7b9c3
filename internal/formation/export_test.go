package formation

// Retry is retry, for the external tests.
var Retry = retry
