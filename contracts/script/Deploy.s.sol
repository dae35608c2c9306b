// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {SolverMarket} from "../src/SolverMarket.sol";

interface VmScript {
    function startBroadcast() external;
    function stopBroadcast() external;
    function envOr(string calldata name, uint256 defaultValue) external view returns (uint256);
}

/// forge script script/Deploy.s.sol --rpc-url URL --private-key KEY --broadcast
/// deploys the market with delays from UNBONDING_BLOCKS / TURN_BLOCKS (defaults 20 / 10),
/// the same defaults as `solvernet chain deploy`, which does this without forge.
contract Deploy {
    VmScript internal constant vm = VmScript(address(uint160(uint256(keccak256("hevm cheat code")))));

    function run() external returns (SolverMarket market) {
        uint64 unbondingBlocks = uint64(vm.envOr("UNBONDING_BLOCKS", 20));
        uint64 turnBlocks = uint64(vm.envOr("TURN_BLOCKS", 10));
        vm.startBroadcast();
        market = new SolverMarket(unbondingBlocks, turnBlocks);
        vm.stopBroadcast();
    }
}
