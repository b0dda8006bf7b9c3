// Package e2e holds volumed's end-to-end tests: the real volumed binary
// against the CloudStack simulator, the embedded NATS server and both
// state stores, driven over REST and NATS.
package e2e
