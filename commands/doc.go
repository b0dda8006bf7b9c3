// Package commands holds volumed's wire contract: the NATS subjects, the
// command and operation messages, device mappings and events, the error
// format, and the validation every request passes before it is accepted.
package commands
