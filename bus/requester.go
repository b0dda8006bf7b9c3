package bus

// CommandRequester is requested_by of a command received on NATS. The
// server lets only the operator role publish on volumes.cmd.* (observer
// and agents may not, and volumed's own daemon identity is denied them),
// so its authorization, not anything the client sends, names the role.
// Every operator credential is the one operator identity today; naming
// operators apart needs one account per principal importing the command
// service with share: true (the server's Nats-Request-Info header).
const CommandRequester = "nats:" + RoleOperator

// commandSubjects are the command subjects only the operator role may
// publish.
const commandSubjects = "volumes.cmd.*"
