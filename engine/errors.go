package engine

import (
	"errors"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/csapi"
)

// CloudStackError maps a final CloudStack failure to 422 CLOUDSTACK_ERROR
// (503 when CloudStack cannot be reached).
func CloudStackError(err error) error {
	var cs *csapi.Error
	if !errors.As(err, &cs) {
		return commands.Internal("cloudstack: %v", err)
	}
	if cs.Retryable {
		return commands.Unavailable("CloudStack unavailable: %s", cs.Text).WithDetail("cloudstack_message", cs.Text)
	}
	return commands.CloudStack("CloudStack %s failed: %s", cs.Command, cs.Text).
		WithDetail("cloudstack_error_code", cs.Code).WithDetail("cloudstack_message", cs.Text)
}

// Failure turns a final CloudStack error into the operation's error;
// anything else is returned as it is.
func Failure(err error) error {
	var cs *csapi.Error
	if errors.As(err, &cs) && !cs.Retryable {
		return CloudStackError(err)
	}
	return err
}

// VolumeNotFound is the 404 for a volume CloudStack does not know.
func VolumeNotFound(volumeID string) *commands.Error {
	return commands.NotFound("volume %s not found in CloudStack", volumeID).WithDetail("volume_id", volumeID)
}
