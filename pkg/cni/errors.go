package cni

import (
	"errors"
	"fmt"
	"syscall"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/vnetbpf/vnetbpf/pkg/api"
)

// cniError turns any error into the *types.Error the runtime reads. An agent's *api.Error
// keeps its code and message, so the runtime sees the agent's verdict (11 "pool empty",
// 3 "unknown container", ...) unchanged.
func cniError(err error) *types.Error {
	var te *types.Error
	if errors.As(err, &te) {
		return te
	}
	var ae *api.Error
	if errors.As(err, &ae) {
		code := ae.Code
		if code == 0 {
			code = types.ErrInternal
		}
		return types.NewError(code, ae.Msg, ae.Details)
	}
	return types.NewError(types.ErrInternal, err.Error(), "")
}

// agentCode is the CNI code of an error the agent client returned, 0 if it is not one.
func agentCode(err error) uint {
	var ae *api.Error
	if errors.As(err, &ae) {
		return ae.Code
	}
	return 0
}

// agentUnavailable reports an agent that is down, hung or asks to be called later. The
// client turns every transport failure into CodeTryAgainLater, so that code is the only
// sign the client gives of an unreachable agent.
func agentUnavailable(err error) bool { return agentCode(err) == api.CodeTryAgainLater }

// isNotFound reports the errors of a link or route that is already gone.
func isNotFound(err error) bool {
	return errors.Is(err, syscall.ENODEV) || errors.Is(err, syscall.ESRCH) || errors.Is(err, syscall.ENOENT)
}

// withRollbackFailure adds to err what could not be undone, so that a person knows what
// to clean up by hand.
func withRollbackFailure(err error, undoErr error) error {
	if undoErr == nil {
		return err
	}
	e := cniError(err)
	details := fmt.Sprintf("rollback incomplete: %v", undoErr)
	if e.Details != "" {
		details = e.Details + "; " + details
	}
	return types.NewError(e.Code, e.Msg, details)
}
