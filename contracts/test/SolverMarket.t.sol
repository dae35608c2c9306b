// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {SolverMarket} from "../src/SolverMarket.sol";
import {TestBase} from "./Vm.sol";

/// Unit and fuzz tests: every function's effect and every forbidden move's revert.
contract SolverMarketTest is TestBase {
    SolverMarket market;
    address submitter = address(0x5001);
    address referee = address(0x5002);
    address solverA = address(0xA1);
    address solverB = address(0xA2);
    address verifier = address(0xB1);
    address stranger = address(0xC1);
    uint88 constant STAKE = 1 ether;
    uint96 constant PRICE = 2 ether;
    uint80 constant FEE = 0.5 ether;

    function setUp() public {
        market = new SolverMarket(10, 5);
        address[4] memory nodes = [solverA, solverB, verifier, stranger];
        for (uint256 i = 0; i < nodes.length; ++i) {
            vm.deal(nodes[i], 100 ether);
            if (nodes[i] == stranger) continue;
            vm.prank(nodes[i]);
            market.register{value: 10 ether}(bytes32(uint256(uint160(nodes[i]))));
        }
        vm.deal(submitter, 100 ether);
        vm.deal(stranger, 100 ether);
    }

    function _post() internal returns (uint256) {
        vm.prank(submitter);
        return market.postJob{value: 2 * PRICE + FEE}(2, 1, PRICE, FEE, STAKE, 20, 10, referee, bytes32("spec"));
    }

    function _postAndCommit() internal returns (uint256 jobId) {
        jobId = _post();
        vm.prank(verifier);
        market.accept(jobId);
        vm.prank(solverA);
        market.commit(jobId, bytes32("rootA"));
        vm.prank(solverB);
        market.commit(jobId, bytes32("rootB"));
    }

    function _lists() internal view returns (address[] memory solvers, address[] memory verifiers) {
        solvers = new address[](2);
        solvers[0] = solverA;
        solvers[1] = solverB;
        verifiers = new address[](1);
        verifiers[0] = verifier;
    }

    // ------------------------------------------------------------ staking

    function testRegisterBindsNodeIdAndStakes() public view {
        assertEq(market.stakeOf(solverA), 10 ether, "stake");
        assertEq(market.nodeIdOf(solverA), bytes32(uint256(uint160(solverA))), "node id");
        assertTrue(market.ownerOfNode(bytes32(uint256(uint160(solverA)))) == solverA, "owner");
    }

    function testRegisterReverts() public {
        vm.prank(stranger);
        vm.expectRevert(bytes("node id is zero"));
        market.register(bytes32(0));
        vm.prank(stranger);
        vm.expectRevert(bytes("node id already bound"));
        market.register(bytes32(uint256(uint160(solverA))));
        vm.prank(solverA);
        vm.expectRevert(bytes("address already registered"));
        market.register(bytes32("other"));
    }

    function testStakeRequiresRegistration() public {
        vm.prank(stranger);
        vm.expectRevert(bytes("not a registered node"));
        market.stake{value: 1 ether}();
        vm.prank(solverA);
        vm.expectRevert(bytes("stake must be > 0"));
        market.stake();
        vm.prank(solverA);
        market.stake{value: 1 ether}();
        assertEq(market.stakeOf(solverA), 11 ether, "stake after top-up");
    }

    function testUnstakeWaitsForUnbonding() public {
        vm.prank(solverA);
        market.unstake(4 ether);
        assertEq(market.stakeOf(solverA), 6 ether, "free stake");
        vm.prank(solverA);
        vm.expectRevert(bytes("nothing to withdraw"));
        market.withdraw();
        vm.roll(block.number + 10);
        uint256 before = solverA.balance;
        vm.prank(solverA);
        market.withdraw();
        assertEq(solverA.balance - before, 4 ether, "unbonded stake paid");
    }

    function testUnstakeReverts() public {
        vm.prank(solverA);
        vm.expectRevert(bytes("amount exceeds free stake"));
        market.unstake(11 ether);
        vm.prank(solverA);
        vm.expectRevert(bytes("amount must be > 0"));
        market.unstake(0);
    }

    function testLockedStakeCannotBeUnstaked() public {
        uint256 jobId = _post();
        vm.prank(solverA);
        market.commit(jobId, bytes32("r"));
        vm.prank(solverA);
        vm.expectRevert(bytes("amount exceeds free stake"));
        market.unstake(10 ether);
    }

    // ------------------------------------------------------------ jobs

    function testPostJobReverts() public {
        vm.startPrank(submitter);
        vm.expectRevert(bytes("value must equal escrow"));
        market.postJob{value: 1}(2, 1, PRICE, FEE, STAKE, 20, 10, referee, 0);
        vm.expectRevert(bytes("stake per role must be > 0"));
        market.postJob(1, 0, 0, 0, 0, 20, 10, referee, 0);
        vm.expectRevert(bytes("solver count must be > 0"));
        market.postJob(0, 1, PRICE, FEE, STAKE, 20, 10, referee, 0);
        vm.expectRevert(bytes("commit blocks must be > 0"));
        market.postJob(1, 0, 0, 0, STAKE, 0, 10, referee, 0);
        vm.expectRevert(bytes("challenge window must be > 0"));
        market.postJob(1, 0, 0, 0, STAKE, 20, 0, referee, 0);
        vm.roll(type(uint32).max - 25);
        vm.expectRevert(bytes("deadlines beyond block 2^32"));
        market.postJob(1, 0, 0, 0, STAKE, 20, 10, referee, 0);
        vm.stopPrank();
    }

    function testGetJobReturnsTheTermsAndProgress() public {
        uint256 jobId = _post();
        vm.prank(solverA);
        market.commit(jobId, bytes32("rootA"));
        SolverMarket.JobView memory job = market.getJob(jobId);
        assertTrue(job.submitter == submitter && job.referee == referee, "parties");
        assertEq(job.solverCount, 2, "solvers");
        assertEq(job.verifierCount, 1, "verifiers");
        assertEq(job.pricePerSolver, PRICE, "price");
        assertEq(job.verifierFee, FEE, "fee");
        assertEq(job.stakePerRole, STAKE, "stake");
        assertEq(job.commitDeadline, block.number + 20, "commit deadline");
        assertEq(job.challengeWindow, 10, "window");
        assertEq(job.lastCommitBlock, block.number, "last commit");
        assertEq(job.committed, 1, "committed");
        assertTrue(!job.finalized, "not finalized");
    }

    /// Referee 0 (or the submitter's own address) means the submitter referees: a job
    /// without verifier seats then stores two slots, and only the submitter may resolve.
    function testZeroRefereeMeansTheSubmitter() public {
        vm.prank(submitter);
        uint256 jobId = market.postJob{value: PRICE}(1, 0, PRICE, 0, STAKE, 20, 10, address(0), 0);
        assertTrue(market.getJob(jobId).referee == submitter, "submitter referees");
        vm.prank(submitter);
        uint256 other = market.postJob{value: PRICE}(1, 0, PRICE, 0, STAKE, 20, 10, submitter, 0);
        assertTrue(market.getJob(other).referee == submitter, "named as itself");
        vm.prank(solverA);
        market.commit(jobId, bytes32("rootA"));
        // A verifier needs a seat, so the job above cannot be challenged: use one that has.
        vm.prank(submitter);
        uint256 seated = market.postJob{value: PRICE + FEE}(1, 1, PRICE, FEE, STAKE, 20, 10, address(0), 0);
        vm.prank(verifier);
        market.accept(seated);
        vm.prank(solverB);
        market.commit(seated, bytes32("rootB"));
        vm.prank(verifier);
        uint256 id = market.challenge{value: STAKE}(seated, solverB, 4, 5);
        vm.prank(referee);
        vm.expectRevert(bytes("only the job's referee"));
        market.resolve(id, true);
        vm.prank(submitter);
        market.resolve(id, true);
        (,, SolverMarket.Turn turn,,,,,,) = market.disputes(id);
        assertTrue(turn == SolverMarket.Turn.Closed, "closed");
    }

    function testAcceptAfterAnEarlyFinalizeReverts() public {
        vm.prank(submitter);
        uint256 jobId = market.postJob{value: PRICE + FEE}(1, 1, PRICE, FEE, STAKE, 100, 3, referee, 0);
        vm.prank(solverA);
        market.commit(jobId, bytes32("rootA"));
        vm.roll(block.number + 4); // window over, commit deadline not: all solver seats are taken
        address[] memory solvers = new address[](1);
        solvers[0] = solverA;
        market.finalize(jobId, solvers, new address[](0));
        vm.prank(verifier);
        vm.expectRevert(bytes("job closed for roles"));
        market.accept(jobId);
        assertEq(market.stakeOf(verifier), 10 ether, "no stake locked in a finalized job");
        assertEq(market.withdrawableOf(submitter), FEE, "the unused verifier seat refunded");
    }

    function testCommitAndAcceptReverts() public {
        uint256 jobId = _post();
        vm.prank(stranger);
        vm.expectRevert(bytes("not a registered node"));
        market.commit(jobId, bytes32("r"));
        vm.prank(solverA);
        vm.expectRevert(bytes("root is zero or reserved"));
        market.commit(jobId, 0);
        vm.prank(solverA);
        vm.expectRevert(bytes("no such job"));
        market.commit(99, bytes32("r"));
        vm.prank(solverA);
        market.commit(jobId, bytes32("r"));
        vm.prank(solverA);
        vm.expectRevert(bytes("already committed"));
        market.commit(jobId, bytes32("r"));
        vm.prank(solverA);
        vm.expectRevert(bytes("a solver cannot verify its own job"));
        market.accept(jobId);
        vm.prank(verifier);
        market.accept(jobId);
        vm.prank(verifier);
        vm.expectRevert(bytes("verifier seats full"));
        market.accept(jobId);
        vm.prank(verifier);
        vm.expectRevert(bytes("a verifier cannot solve"));
        market.commit(jobId, bytes32("r"));
        vm.prank(solverB);
        market.commit(jobId, bytes32("r"));
        vm.prank(stranger);
        vm.expectRevert(bytes("solver seats full"));
        market.commit(jobId, bytes32("r"));
    }

    function testCommitAfterDeadlineReverts() public {
        uint256 jobId = _post();
        vm.roll(block.number + 21);
        vm.prank(solverA);
        vm.expectRevert(bytes("commit deadline passed"));
        market.commit(jobId, bytes32("r"));
        vm.prank(verifier);
        vm.expectRevert(bytes("job closed for roles"));
        market.accept(jobId);
    }

    function testCommitNeedsEnoughFreeStake() public {
        vm.prank(submitter);
        uint256 jobId = market.postJob(1, 0, 0, 0, 50 ether, 20, 10, referee, 0);
        vm.prank(solverA);
        vm.expectRevert(bytes("free stake below the job's stake"));
        market.commit(jobId, bytes32("r"));
    }

    function testHonestJobPaysAndUnlocks() public {
        uint256 jobId = _postAndCommit();
        assertEq(market.stakeOf(solverA), 9 ether, "stake locked");
        (address[] memory solvers, address[] memory verifiers) = _lists();
        vm.expectRevert(bytes("challenge window not over"));
        market.finalize(jobId, solvers, verifiers);
        vm.roll(block.number + 11);
        market.finalize(jobId, solvers, verifiers);
        assertEq(market.stakeOf(solverA), 10 ether, "stake unlocked");
        assertEq(market.withdrawableOf(solverA), PRICE, "solver paid");
        assertEq(market.withdrawableOf(verifier), FEE, "verifier paid");
        assertEq(market.withdrawableOf(submitter), 0, "nothing refunded");
        vm.expectRevert(bytes("job already finalized"));
        market.finalize(jobId, solvers, verifiers);
        uint256 before = solverA.balance;
        vm.prank(solverA);
        market.withdraw();
        assertEq(solverA.balance - before, PRICE, "withdrawn");
    }

    function testFinalizeRejectsBadLists() public {
        uint256 jobId = _postAndCommit();
        vm.roll(block.number + 11);
        (address[] memory solvers, address[] memory verifiers) = _lists();
        solvers[1] = solverA;
        vm.expectRevert(bytes("not a live solver of the job"));
        market.finalize(jobId, solvers, verifiers);
        address[] memory one = new address[](1);
        one[0] = solverA;
        vm.expectRevert(bytes("solver list must name every live commit"));
        market.finalize(jobId, one, verifiers);
        (solvers,) = _lists();
        verifiers[0] = stranger;
        vm.expectRevert(bytes("not a verifier of the job"));
        market.finalize(jobId, solvers, verifiers);
    }

    function testEarlyFinalizeRevertsWhileSeatsOpen() public {
        uint256 jobId = _post();
        vm.prank(solverA);
        market.commit(jobId, bytes32("r"));
        vm.roll(block.number + 11);
        address[] memory solvers = new address[](1);
        solvers[0] = solverA;
        vm.expectRevert(bytes("commit phase not over"));
        market.finalize(jobId, solvers, new address[](0));
        vm.roll(block.number + 20);
        market.finalize(jobId, solvers, new address[](0));
        assertEq(market.withdrawableOf(submitter), PRICE + FEE, "unused seats refunded");
    }

    // ------------------------------------------------------------ disputes

    function _challenge(uint256 jobId, uint48 lo, uint48 hi) internal returns (uint256 id) {
        vm.prank(verifier);
        id = market.challenge{value: STAKE}(jobId, solverA, lo, hi);
    }

    function testChallengeReverts() public {
        uint256 jobId = _postAndCommit();
        vm.prank(stranger);
        vm.expectRevert(bytes("only a verifier of the job"));
        market.challenge{value: STAKE}(jobId, solverA, 0, 8);
        vm.prank(verifier);
        vm.expectRevert(bytes("bond below the job's stake"));
        market.challenge{value: 1}(jobId, solverA, 0, 8);
        vm.prank(verifier);
        vm.expectRevert(bytes("empty step range"));
        market.challenge{value: STAKE}(jobId, solverA, 8, 8);
        vm.prank(verifier);
        vm.expectRevert(bytes("no commit to challenge"));
        market.challenge{value: STAKE}(jobId, stranger, 0, 8);
        _challenge(jobId, 0, 8);
        vm.prank(verifier);
        vm.expectRevert(bytes("commit already challenged"));
        market.challenge{value: STAKE}(jobId, solverA, 0, 8);
        (address[] memory solvers, address[] memory verifiers) = _lists();
        vm.roll(block.number + 11);
        vm.expectRevert(bytes("a dispute is open"));
        market.finalize(jobId, solvers, verifiers);
    }

    function testChallengeAfterWindowReverts() public {
        uint256 jobId = _postAndCommit();
        vm.roll(block.number + 11);
        vm.prank(verifier);
        vm.expectRevert(bytes("challenge window over"));
        market.challenge{value: STAKE}(jobId, solverA, 0, 8);
    }

    function testBisectionThenRefereeSlashesSolver() public {
        uint256 jobId = _postAndCommit();
        uint256 id = _challenge(jobId, 0, 8);
        uint256 burnBefore = address(0xdEaD).balance;
        // Out-of-turn moves revert.
        vm.prank(verifier);
        vm.expectRevert(bytes("not the challenger's turn"));
        market.bisect(id, true);
        vm.prank(solverB);
        vm.expectRevert(bytes("only the disputed solver"));
        market.claimMidpoint(id, bytes32("h4"));
        vm.prank(referee);
        vm.expectRevert(bytes("dispute not narrowed to one step"));
        market.resolve(id, true);
        // (0,8] -> mid 4 agree -> (4,8] -> mid 6 disagree -> (4,6] -> mid 5 agree -> (5,6].
        bool[3] memory answers = [true, false, true];
        for (uint256 i = 0; i < 3; ++i) {
            vm.prank(solverA);
            market.claimMidpoint(id, keccak256(abi.encode(i)));
            vm.prank(solverA);
            vm.expectRevert(bytes("not the solver's turn"));
            market.claimMidpoint(id, bytes32("again"));
            vm.prank(verifier);
            market.bisect(id, answers[i]);
        }
        (,,, , uint48 lo, uint48 hi,,,) = market.disputes(id);
        assertEq(lo, 5, "lo");
        assertEq(hi, 6, "hi");
        vm.prank(stranger);
        vm.expectRevert(bytes("only the job's referee"));
        market.resolve(id, false);
        vm.prank(referee);
        market.resolve(id, false);
        assertEq(market.withdrawableOf(verifier), STAKE + STAKE / 2, "bond back plus half the slash");
        assertEq(address(0xdEaD).balance - burnBefore, STAKE / 2, "half burnt");
        vm.prank(referee);
        vm.expectRevert(bytes("dispute not narrowed to one step"));
        market.resolve(id, true);
        // The slashed solver is not paid and cannot come back; its seat is refunded.
        vm.roll(block.number + 30);
        address[] memory solvers = new address[](1);
        solvers[0] = solverB;
        (, address[] memory verifiers) = _lists();
        market.finalize(jobId, solvers, verifiers);
        assertEq(market.withdrawableOf(solverA), 0, "slashed solver unpaid");
        assertEq(market.stakeOf(solverA), 9 ether, "slashed stake never returns");
        assertEq(market.withdrawableOf(submitter), PRICE, "slashed seat refunded");
    }

    function testRefereeSidesWithSolver() public {
        uint256 jobId = _postAndCommit();
        uint256 id = _challenge(jobId, 3, 4);
        vm.prank(referee);
        market.resolve(id, true);
        assertEq(market.withdrawableOf(solverA), STAKE / 2, "solver gets half the bond");
        vm.roll(block.number + 11);
        (address[] memory solvers, address[] memory verifiers) = _lists();
        market.finalize(jobId, solvers, verifiers);
        assertEq(market.withdrawableOf(solverA), STAKE / 2 + PRICE, "and its pay");
    }

    function testMissedTurnLoses() public {
        uint256 jobId = _postAndCommit();
        uint256 id = _challenge(jobId, 0, 8);
        vm.expectRevert(bytes("turn deadline not passed"));
        market.timeout(id);
        vm.roll(block.number + 6);
        vm.prank(solverA);
        vm.expectRevert(bytes("turn deadline passed"));
        market.claimMidpoint(id, bytes32("late"));
        market.timeout(id);
        assertEq(market.commitOf(jobId, solverA), bytes32(0), "timed-out solver's commit removed");
        vm.expectRevert(bytes("no turn to time out"));
        market.timeout(id);
    }

    function testChallengerMissingTurnLosesBond() public {
        uint256 jobId = _postAndCommit();
        uint256 id = _challenge(jobId, 0, 8);
        vm.prank(solverA);
        market.claimMidpoint(id, bytes32("h"));
        vm.roll(block.number + 6);
        vm.prank(verifier);
        vm.expectRevert(bytes("turn deadline passed"));
        market.bisect(id, true);
        market.timeout(id);
        assertEq(market.withdrawableOf(solverA), STAKE / 2, "solver rewarded");
        assertEq(market.withdrawableOf(verifier), 0, "bond lost");
    }

    // ------------------------------------------------------------ fuzz

    function testFuzzEscrowAndRefund(uint16 solverCount, uint16 verifierCount, uint64 price, uint64 fee, uint8 commits)
        public
    {
        solverCount = uint16(bound(solverCount, 1, 50));
        verifierCount = uint16(bound(verifierCount, 0, 50));
        commits = uint8(bound(commits, 0, solverCount < 3 ? solverCount : 3));
        uint256 escrow = uint256(solverCount) * price + uint256(verifierCount) * fee;
        vm.deal(submitter, escrow);
        vm.prank(submitter);
        uint256 jobId = market.postJob{value: escrow}(solverCount, verifierCount, price, fee, STAKE, 5, 3, referee, 0);
        address[3] memory all = [solverA, solverB, verifier];
        address[] memory solvers = new address[](commits);
        for (uint256 i = 0; i < commits; ++i) {
            vm.prank(all[i]);
            market.commit(jobId, bytes32(i + 100));
            solvers[i] = all[i];
        }
        vm.roll(block.number + 10);
        uint256 held = address(market).balance;
        market.finalize(jobId, solvers, new address[](0));
        uint256 credited = market.withdrawableOf(submitter);
        for (uint256 i = 0; i < commits; ++i) credited += market.withdrawableOf(all[i]);
        assertEq(credited, escrow, "escrow fully accounted");
        assertEq(address(market).balance, held, "nothing left the contract");
    }

    function testFuzzUnstakeNeverExceedsStake(uint128 amount) public {
        vm.prank(solverA);
        if (amount == 0) {
            vm.expectRevert(bytes("amount must be > 0"));
        } else if (amount > 10 ether) {
            vm.expectRevert(bytes("amount exceeds free stake"));
        }
        market.unstake(amount);
    }

    function bound(uint256 x, uint256 lo, uint256 hi) internal pure returns (uint256) {
        return lo + x % (hi - lo + 1);
    }
}
