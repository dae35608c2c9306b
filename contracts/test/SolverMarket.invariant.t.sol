// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {SolverMarket} from "../src/SolverMarket.sol";
import {MerkleTree} from "./MerkleTree.sol";
import {TestBase, Vm} from "./Vm.sol";

/// Drives the market with random but well-formed moves from a few actors and keeps
/// ghost totals of the value that went in and out.
contract MarketHandler {
    Vm internal constant vm = Vm(address(uint160(uint256(keccak256("hevm cheat code")))));
    SolverMarket public market;
    address[4] public actors = [address(0xA1), address(0xA2), address(0xA3), address(0xA4)];
    address public referee = address(0xEEFF);
    uint256 public deposited;
    uint256 public withdrawn;
    uint256[] public jobIds;
    uint256[] public disputeIds;

    constructor(SolverMarket market_) {
        market = market_;
        for (uint256 i = 0; i < actors.length; ++i) {
            vm.deal(actors[i], 1_000 ether);
            vm.prank(actors[i]);
            market.register{value: 5 ether}(bytes32(i + 1));
            deposited += 5 ether;
        }
    }

    function _actor(uint256 seed) internal view returns (address) {
        return actors[seed % actors.length];
    }

    function stake(uint256 who, uint96 amount) external {
        amount = uint96(1 + amount % 3 ether);
        vm.prank(_actor(who));
        market.stake{value: amount}();
        deposited += amount;
    }

    function unstake(uint256 who, uint128 amount) external {
        address a = _actor(who);
        uint256 free = market.stakeOf(a);
        if (free == 0) return;
        vm.prank(a);
        market.unstake(uint128(1 + amount % free));
    }

    function withdraw(uint256 who) external {
        address a = _actor(who);
        uint256 before = a.balance;
        vm.prank(a);
        try market.withdraw() {
            withdrawn += a.balance - before;
        } catch {}
    }

    /// Half the jobs name the submitter as referee (referee 0), half a separate referee.
    function post(uint256 who, uint8 solvers, uint8 verifiers, uint64 price) external {
        solvers = uint8(1 + solvers % 3);
        verifiers = uint8(verifiers % 2);
        uint256 escrow = uint256(solvers) * price + uint256(verifiers) * (price / 4);
        vm.prank(_actor(who));
        address judge = price % 2 == 0 ? address(0) : referee;
        jobIds.push(market.postJob{value: escrow}(solvers, verifiers, price, price / 4, 1 ether, 6, 30, judge, 0));
        deposited += escrow;
    }

    uint48 internal constant LEAVES = 8;

    function _leaves(address who) internal pure returns (bytes32[] memory leaves) {
        leaves = new bytes32[](LEAVES);
        for (uint256 t = 0; t < LEAVES; ++t) leaves[t] = keccak256(abi.encodePacked(who, t));
    }

    /// An interim commit (4 leaves) or the final one (8).
    function commit(uint256 who, uint256 job, bool isFinal) external {
        if (jobIds.length == 0) return;
        address a = _actor(who);
        vm.prank(a);
        uint48 count = isFinal ? LEAVES : 4;
        bytes32[] memory all = _leaves(a);
        bytes32[] memory leaves = new bytes32[](count);
        for (uint256 t = 0; t < count; ++t) leaves[t] = all[t];
        try market.commit(jobIds[job % jobIds.length], MerkleTree.root(leaves), count, isFinal) {} catch {}
    }

    /// The selected node takes the next seat, once the seed is known (waiting for
    /// the commit deadline and the seed block if need be).
    function accept(uint256 job) external {
        if (jobIds.length == 0) return;
        uint256 jobId = jobIds[job % jobIds.length];
        SolverMarket.JobView memory terms = market.getJob(jobId);
        uint256 seedBlock = terms.allFinal ? terms.lastCommitBlock + 1 : terms.commitDeadline + 1;
        if (block.number <= seedBlock) vm.roll(seedBlock + 1);
        try market.selectedVerifier(jobId, market.getJob(jobId).verifiersAccepted) returns (address chosen) {
            if (chosen == address(0)) return;
            vm.prank(chosen);
            try market.accept(jobId) {} catch {}
        } catch {}
    }

    /// A verifier of the job (if any) challenges a live commit of an actor.
    function challenge(uint256 solver, uint256 job, uint8 span) external {
        if (jobIds.length == 0) return;
        uint256 jobId = jobIds[job % jobIds.length];
        address challenger;
        for (uint256 i = 0; i < actors.length; ++i) {
            if (market.isVerifier(jobId, actors[i])) challenger = actors[i];
        }
        if (challenger == address(0)) return;
        address s;
        uint48 count;
        for (uint256 i = 0; i < actors.length && s == address(0); ++i) {
            address candidate = _actor(solver % actors.length + i);
            (count,) = market.commitInfo(jobId, candidate);
            if (count >= 2 && market.commitOf(jobId, candidate) != 0 && market.disputeOf(jobId, candidate) == 0) {
                s = candidate;
            }
        }
        if (s == address(0)) return;
        bytes32[] memory leaves = _leaves(s);
        uint48 hi = uint48(1 + span % (count - 1));
        vm.prank(challenger);
        try market.challenge{value: 1 ether}(
            jobId, s, 0, leaves[0], _proof(s, count, 0), hi, leaves[hi], _proof(s, count, hi)
        ) returns (uint256 id) {
            disputeIds.push(id);
            deposited += 1 ether;
        } catch {}
    }

    function _proof(address who, uint48 count, uint256 index) internal pure returns (bytes32[] memory) {
        bytes32[] memory all = _leaves(who);
        bytes32[] memory leaves = new bytes32[](count);
        for (uint256 t = 0; t < count; ++t) leaves[t] = all[t];
        return MerkleTree.proof(leaves, index);
    }

    /// Up to eight moves of one dispute, each by whoever's turn it is.
    function play(uint256 dispute, bool agree, bool solverWins, uint8 ops) external {
        if (disputeIds.length == 0) return;
        uint256 id = disputeIds[dispute % disputeIds.length];
        for (uint256 move = 0; move <= ops % 8; ++move) {
            if (!_move(id, (dispute >> move) & 1 == 1 ? agree : !agree, solverWins, ops)) return;
        }
    }

    function _move(uint256 id, bool agree, bool solverWins, uint8 ops) internal returns (bool) {
        SolverMarket.DisputeView memory d = market.getDispute(id);
        if (block.number > d.deadline) return false; // only timeout() may move it now
        SolverMarket.Stage stage = d.stage;
        if (stage == SolverMarket.Stage.StepClaim) {
            uint256 mid = (uint256(d.lo) + d.hi) / 2;
            (uint48 count,) = market.commitInfo(d.jobId, d.solver);
            vm.prank(d.solver);
            market.claimLeaf(id, _leaves(d.solver)[mid], _proof(d.solver, count, mid));
        } else if (stage == SolverMarket.Stage.OpsPost) {
            vm.prank(d.solver);
            market.postOps(id, 2 + uint48(ops % 6), bytes32(id), 0, 0, 0);
        } else if (stage == SolverMarket.Stage.OpsClaim) {
            vm.prank(d.solver);
            market.claimOp(id, bytes32(uint256(ops)));
        } else if (stage == SolverMarket.Stage.StepBisect || stage == SolverMarket.Stage.OpsBisect) {
            vm.prank(d.challenger);
            market.bisect(id, agree);
        } else if (stage == SolverMarket.Stage.Referee) {
            vm.prank(market.getJob(d.jobId).referee);
            market.resolve(id, solverWins);
        } else {
            return false;
        }
        return true;
    }

    function advance(uint8 blocks) external {
        vm.roll(block.number + 1 + blocks % 4);
    }

    function timeout(uint256 dispute) external {
        if (disputeIds.length == 0) return;
        try market.timeout(disputeIds[dispute % disputeIds.length]) {} catch {}
    }

    function finalize(uint256 job) external {
        if (jobIds.length == 0) return;
        uint256 jobId = jobIds[job % jobIds.length];
        address[] memory solvers = new address[](4);
        address[] memory verifiers = new address[](4);
        uint256 s;
        uint256 v;
        for (uint256 i = 0; i < actors.length; ++i) {
            if (market.commitOf(jobId, actors[i]) != bytes32(0)) solvers[s++] = actors[i];
            if (market.isVerifier(jobId, actors[i])) verifiers[v++] = actors[i];
        }
        assembly {
            mstore(solvers, s)
            mstore(verifiers, v)
        }
        try market.finalize(jobId, solvers, verifiers) {} catch {}
    }

    /// Everything the market owes accounts directly (free stake, pull balances, unbonding).
    function owedToAccounts() external view returns (uint256 total) {
        for (uint256 i = 0; i < actors.length; ++i) {
            (uint128 free, uint128 pull) = market.accounts(actors[i]);
            (uint128 unbonding,) = market.unbondings(actors[i]);
            total += free + pull + unbonding;
        }
        (, uint128 refereePull) = market.accounts(referee);
        total += refereePull;
    }
}

contract SolverMarketInvariantTest is TestBase {
    SolverMarket market;
    MarketHandler handler;

    function setUp() public {
        market = new SolverMarket(5, 8);
        handler = new MarketHandler(market);
    }

    function targetContracts() public view returns (address[] memory targets) {
        targets = new address[](1);
        targets[0] = address(handler);
    }

    /// Value held = everything deposited (stakes, escrow, bonds) - paid out - burnt.
    function invariant_valueIsConserved() public view {
        assertEq(
            address(market).balance,
            handler.deposited() - handler.withdrawn() - address(0xdEaD).balance,
            "market balance"
        );
    }

    /// The market always holds at least what accounts could claim right now, so no one
    /// can withdraw what is staked in a job or escrowed, and no slash pays twice.
    function invariant_solvent() public view {
        assertTrue(address(market).balance >= handler.owedToAccounts(), "owes more than it holds");
    }
}
