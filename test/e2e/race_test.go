//go:build race

package e2e_test

// raceBuild makes the daemon binary under test a race-detector build too.
const raceBuild = true
